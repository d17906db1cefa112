"""The pieces of the loop that need no process group: data order, env, checkpoints, progress."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from trainer import checkpoint
from trainer.distributed import DistEnv
from trainer.loop import make_loader
from trainer.progress import ProgressLog, read_events
from trainer.spec import TrainSpec
from trainer.tasks.digits import Digits, DigitsCNN, DigitsConfig
from trainer.tasks.digits_data import load_split


def _train_set() -> TensorDataset:
    return Digits(DigitsConfig()).datasets().train  # type: ignore[return-value]


def _env(rank: int, world: int) -> DistEnv:
    return DistEnv(rank=rank, world_size=world, local_rank=rank, master_addr="127.0.0.1", master_port=1)


def _examples(x: torch.Tensor, y: torch.Tensor) -> list[tuple[int, bytes]]:
    return sorted((int(label), img.numpy().tobytes()) for img, label in zip(x, y, strict=True))


@pytest.mark.parametrize("world", [2, 4])
def test_every_world_size_sees_the_same_global_batches(world: int) -> None:
    """The parity argument of trainer.loop, checked on the real sampler and loader."""
    split, train = load_split(), _train_set()
    spec = TrainSpec(nproc_per_node=1, global_batch_size=64, seed=7)
    for epoch in (1, 2):
        single = make_loader(train, spec, _env(0, 1))
        single.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        ranks = [make_loader(train, spec, _env(r, world)) for r in range(world)]
        for loader in ranks:
            loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        one = list(single)
        many = list(zip(*ranks, strict=True))
        assert len(one) == len(many) == split.num_train // 64
        for (x1, y1), shards in zip(one, many, strict=True):
            assert all(len(y) == 64 // world for _, y in shards)
            assert _examples(x1, y1) == _examples(
                torch.cat([x for x, _ in shards]), torch.cat([y for _, y in shards])
            )
    a = [y for _, y in make_loader(train, spec, _env(0, 1))]
    loader = make_loader(train, spec, _env(0, 1))
    loader.sampler.set_epoch(3)  # type: ignore[attr-defined]
    assert any(not torch.equal(x, y) for x, y in zip(a, [y for _, y in loader], strict=True))


def test_make_loader_rejects_indivisible_batch() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        make_loader(_train_set(), TrainSpec(global_batch_size=64, nproc_per_node=1), _env(0, 3))


def test_dist_env_from_torchrun_pet_and_bare() -> None:
    tr = DistEnv.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "7"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.master_addr, tr.master_port) == (1, 2, 1, "h", 7)
    pet = DistEnv.from_env({"PET_NODE_RANK": "2", "PET_NNODES": "3", "PET_MASTER_ADDR": "m", "PET_MASTER_PORT": "9"})
    assert (pet.rank, pet.world_size, pet.master_addr, pet.master_port) == (2, 3, "m", 9)
    bare = DistEnv.from_env({})
    assert (bare.rank, bare.world_size, bare.is_main) == (0, 1, True)
    with pytest.raises(ValueError, match="outside"):
        DistEnv.from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_checkpoint_round_trip_and_identity_check(tmp_path: Path) -> None:
    spec = TrainSpec()
    ident = checkpoint.identity(spec, "trainer.tasks.digits:Digits", {"lr": 0.05})
    model = DigitsCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(2, 1, 8, 8)).sum().backward()
    opt.step()
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, checkpoint.Checkpoint(
        epoch=3, model=model.state_dict(), optimizer=opt.state_dict(), rng=torch.get_rng_state(),
        identity=ident, step=7,
    ))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind
    # extending a run is allowed
    ck = checkpoint.load(path, checkpoint.identity(spec.replace(epochs=20), "trainer.tasks.digits:Digits", {"lr": 0.05}))
    assert ck is not None and (ck.epoch, ck.step) == (3, 7)
    for k, v in model.state_dict().items():
        assert torch.equal(ck.model[k], v)
    assert checkpoint.load(tmp_path / "none.pt", ident) is None
    with pytest.raises(checkpoint.CheckpointMismatch, match="seed"):
        checkpoint.load(path, checkpoint.identity(spec.replace(seed=1), "trainer.tasks.digits:Digits", {"lr": 0.05}))
    with pytest.raises(checkpoint.CheckpointMismatch, match="config"):
        checkpoint.load(path, checkpoint.identity(spec, "trainer.tasks.digits:Digits", {"lr": 0.1}))
    with pytest.raises(checkpoint.CheckpointMismatch, match="task"):
        checkpoint.load(path, checkpoint.identity(spec, "other:Task", {"lr": 0.05}))


def test_progress_log_and_partial_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = ProgressLog(tmp_path, enabled=True)
    log.emit("epoch", epoch=1, epochs=2, loss=0.5, held_out={"rmse": 0.9}, samples_per_s=100.0, steps=3)
    ProgressLog(tmp_path, enabled=False).emit("epoch", epoch=9)  # other ranks write nothing
    assert "epoch 1/2 loss 0.5000 held-out rmse 0.9000" in capsys.readouterr().out
    with open(log.path, "a") as f:
        f.write('{"event": "ep')  # a write in flight
    events, offset = read_events(log.path)
    assert [e["epoch"] for e in events] == [1]
    with open(log.path, "a") as f:
        f.write('och", "epoch": 2}\n')
    more, _ = read_events(log.path, offset)
    assert more == [{"event": "epoch", "epoch": 2}]
    assert json.loads(log.path.read_text().splitlines()[0])["event"] == "epoch"


def test_the_fingerprint_hashes_bfloat16_items_by_their_bits() -> None:
    from trainer.data import fingerprint

    x = torch.linspace(0, 1, 12).reshape(3, 4)
    as_bf16 = [(x[i].to(torch.bfloat16), torch.tensor(i)) for i in range(3)]
    as_f32 = [(x[i], torch.tensor(i)) for i in range(3)]
    definition = {"source": "generated"}
    fp = fingerprint(definition, as_bf16)  # type: ignore[arg-type]  # a list is a Dataset here
    assert fp == fingerprint(definition, list(as_bf16))  # type: ignore[arg-type]
    assert fp != fingerprint(definition, as_f32)  # type: ignore[arg-type]
    changed = [(as_bf16[0][0] + 1, as_bf16[0][1]), *as_bf16[1:]]
    assert fp != fingerprint(definition, changed)  # type: ignore[arg-type]
