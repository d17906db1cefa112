"""kloop's trainer: any task a user writes (``trainer.task``), trained with DDP under torchrun
locally or in PyTorchJob / TrainJob pods, evaluated, exported and published.

Modules, by concern (import what you need; this package imports nothing heavy on its own):

    task        the Task contract, Metric, Datasets; resolving names (kloop.tasks entry points)
    task_check  resolve + check a task before any process starts; its signature
    tasks/      the built-in example tasks: digits, breast-cancer, diabetes
    spec        TrainSpec and its nested config (no torch)   job_manifests  PyTorchJob / TrainJob
    code        pack / verify / unpack a task's code dir     data       fingerprint, batches, shards
    main        ``python -m trainer.main`` (the one entry)   loop       DDP training loop
    distributed launcher env, process group                  checkpoint atomic epoch/step state
    progress    events -> stdout + progress.jsonl            rundir     run-directory layout
    evaluate    all-reducible held-out metrics               served     the served graph, export
    launch      run_local (real torchrun subprocess)         publish    registry publish + lineage

``trainer`` never imports ``serving`` or ``deploy`` (checked by import-linter).
"""
