"""Object-store servers on 127.0.0.1 for the tests: the GCS emulator (gcp-storage-emulator)
with the two requests of real GCS it lacks, and a free port for any server."""

import socket
from http import HTTPStatus

BUCKET = "clip-bucket"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gcs(port: int):
    """The emulator serving BUCKET on `port`, in memory, in a thread; `.stop()` it."""
    from gcp_storage_emulator.server import create_server  # noqa: PLC0415 (test-only server)

    _send_generation_headers()
    _add_object_moves()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    return server


def _send_generation_headers() -> None:
    """Real GCS sends an object's generation as `x-goog-generation` with its bytes; the
    emulator does not, and tensorstore (checkpoint reads) refuses a read without it. Adds
    the header to the emulator's downloads (test infrastructure; nothing of ours changes)."""
    from gcp_storage_emulator import server  # noqa: PLC0415 (test-only server)
    from gcp_storage_emulator.handlers import objects  # noqa: PLC0415 (test-only server)

    original = objects.download
    if getattr(original, "sends_generation", False):
        return

    def download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
        except Exception:  # a missing object: the original handler answers 404
            pass
        return original(request, response, storage, *args, **kwargs)

    download.sends_generation = True
    objects.download = download
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is original:
                handlers[method] = download


def _add_object_moves() -> None:
    """Real GCS moves an object in one request (`moveTo`), which gcsfs's rename (and so
    tfds' renames) sends first; the emulator answers 501, which gcsfs retries for about 35 s
    before it copies and deletes instead. Adds `moveTo` as a copy and a delete (test
    infrastructure; nothing of ours changes)."""
    from gcp_storage_emulator import server, settings  # noqa: PLC0415 (test-only server)
    from gcp_storage_emulator.exceptions import NotFound  # noqa: PLC0415 (test-only server)
    from gcp_storage_emulator.handlers import objects  # noqa: PLC0415 (test-only server)

    if any("moveTo" in regex for regex, _ in server.HANDLERS):
        return

    def move(request, response, storage, *args, **kwargs):
        bucket, source = request.params["bucket_name"], request.params["object_id"]
        try:
            moved = objects._copy(
                request.base_url, storage, bucket, source, bucket, request.params["dest_object_id"]
            )
        except NotFound:
            response.status = HTTPStatus.NOT_FOUND
            return
        storage.delete_file(bucket, source)
        response.json(moved)

    routes = tuple(
        (
            rf"^{prefix}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
            r"(?P<dest_object_id>.*[^/]+)$",
            {"POST": move},
        )
        for prefix in (settings.API_ENDPOINT, "")
    )
    server.HANDLERS = routes + tuple(server.HANDLERS)
