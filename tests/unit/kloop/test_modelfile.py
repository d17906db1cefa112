"""The model loader refuses every archive entry torch would unpickle, BEFORE torch sees it:
a crafted archive whose payload would run code on unpickling is refused and the code never
runs; a plain export loads."""

from __future__ import annotations

import contextlib
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch

from kloop.modelfile import UnsafeModelFile, check_export_archive, load_exported


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class _Boom:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    ep = torch.export.export(_Tiny().eval(), (torch.zeros(2, 4),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    path = tmp_path / "model.pt2"
    torch.export.save(ep, path)
    return path


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy the zip, letting ``edit(name, data) -> list[(name, data)]`` change entries."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            for name, data in edit(info.filename, zin.read(info.filename)):
                zout.writestr(name, data)
    return dst


def test_a_plain_export_loads_and_runs(archive: Path) -> None:
    module = load_exported(archive)
    assert module(torch.zeros(5, 4)).shape == (5, 2)


def test_a_pickled_weight_is_refused_before_it_runs(archive: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    buf = io.BytesIO()
    torch.save(_Boom(marker), buf)

    def edit(name: str, data: bytes):
        if name.endswith("_weights_config.json"):
            doc = json.loads(data)
            first = next(iter(doc["config"].values()))
            first["use_pickle"] = True
            return [(name, json.dumps(doc))]
        if name.endswith("/weights/weight_0"):
            return [(name, buf.getvalue())]
        return [(name, data)]

    bad = _rewrite(archive, tmp_path / "bad.pt2", edit)
    with pytest.raises(UnsafeModelFile, match="pickled"):
        load_exported(bad)
    assert not marker.exists()
    # The check is what protects: torch on its own runs the payload.
    with contextlib.suppress(Exception):
        torch.export.load(str(bad))
    assert marker.exists()


def test_sample_inputs_that_need_unpickling_are_refused(archive: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    buf = io.BytesIO()
    torch.save(((_Boom(marker),), {}), buf)

    def edit(name: str, data: bytes):
        return [(name, buf.getvalue() if "/sample_inputs/" in name else data)]

    with pytest.raises(UnsafeModelFile, match="unpickling"):
        check_export_archive(_rewrite(archive, tmp_path / "bad.pt2", edit))
    assert not marker.exists()


@pytest.mark.parametrize("extra", ["data/weights/model.pt", "data/constants/opaque_obj_0",
                                   "data/constants/custom_obj_0", "data/aotinductor/model/x.so"])
def test_entries_outside_the_allow_list_are_refused(archive: Path, tmp_path: Path, extra: str) -> None:
    def edit(name: str, data: bytes):
        root = name.split("/", 1)[0]
        out = [(name, data)]
        if name.endswith("archive_format"):
            out.append((f"{root}/{extra}", b"x"))
        return out

    with pytest.raises(UnsafeModelFile, match="not allowed"):
        check_export_archive(_rewrite(archive, tmp_path / "bad.pt2", edit))


def test_not_a_zip_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "model.pt2"
    p.write_bytes(b"not a zip")
    with pytest.raises(UnsafeModelFile):
        check_export_archive(p)
