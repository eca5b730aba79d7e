"""tfds builders: `image_text` (a user's webdataset tars / JSONL / CSV, see
image_text.make_builder) and `clip_demo` (procedural shapes). Both write ArrayRecord."""
