"""The layout of a run directory, in one place: the loop writes it, the launcher, the publisher
and the pipeline read it.

    <run-dir>/progress.jsonl        events, appended (trainer.progress)
    <run-dir>/checkpoint.pt         last completed epoch (trainer.checkpoint)
    <run-dir>/export/model.pt2      the torch.export program for serving
    <run-dir>/metrics.json          held-out evaluation of the exported program
    <run-dir>/result.json           metrics + training summary + spec
    <run-dir>/train.log             all processes' output (local launcher only)
"""

PROGRESS_FILE = "progress.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
EXPORT_DIR = "export"
MODEL_FILE = "model.pt2"
METRICS_FILE = "metrics.json"
RESULT_FILE = "result.json"
LOG_FILE = "train.log"
