"""kloop's trainer: data, models, the training entry point, evaluation, export, publishing and
launchers (local torchrun, PyTorchJob, TrainJob).

Modules, by concern (import what you need; this package imports nothing heavy on its own):

    spec        TrainSpec and its nested config (no torch)      k8s       PyTorchJob / TrainJob (no torch)
    data        digits split + fingerprint                      models    architectures, serving wrapper
    main        ``python -m trainer.main`` (the one entry)      loop      DDP training loop
    distributed launcher env, process group                     checkpoint atomic per-epoch state
    progress    events -> stdout + progress.jsonl               rundir    run-directory layout
    evaluate    held-out metrics                                export    torch.export for serving
    launch      run_local (real torchrun subprocess)            publish   registry publish / load back

``trainer`` never imports ``serving`` or ``deploy`` (checked by import-linter).
"""
