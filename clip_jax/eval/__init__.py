"""Evaluation of a model state: zero-shot classification, retrieval, linear probe, Tip-Adapter.

Data tables (``templates``, ``classnames``), pure metrics on features (``metrics``), features
of a model on the mesh (``features``), task strings (``tasks``), the evaluators
(``evaluators``), result files (``results``) and the entry point shared by training and
``clip_jax.evaluate`` (``runner.evaluate_state``). The ``eval`` config group is ``schema``.
"""
