"""What a run folder is trusted with: resuming runs no pickled code, a refused start changes nothing, one
training at a time holds the folder, and a fresh run moves aside only a folder this project wrote."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import TINY, _env, _train_in_subprocess

from blip2_fast.checkpoint import load_vision
from blip2_fast.train import RunFolderLock, _load_legacy_rng, _rng_state, _set_rng_state, load_rng, save_rng


class Payload:
    """Unpickled, it creates the folder ``marker``: the proof that a load ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _draws() -> tuple:
    return torch.rand(4).tolist(), np.random.randn(3).tolist(), random.gauss(0, 1), random.random()


def test_rng_state_is_stored_without_pickle_and_restored_exactly(tmp_path):
    np.random.seed(3)
    np.random.randn(1)  # leaves a cached gaussian, part of numpy's state
    random.seed(5)
    random.gauss(0, 1)  # and python's
    save_rng(tmp_path / "rng.safetensors")
    torch.save({**_rng_state(), "cuda": None}, tmp_path / "rng.pt")  # what checkpoints held before
    want = _draws()
    for state in (load_rng(tmp_path / "rng.safetensors"), _load_legacy_rng(tmp_path / "rng.pt")):
        _set_rng_state(state)
        assert _draws() == want

    marker = tmp_path / "ran"
    torch.save({"torch": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt: refused: .*posix\.mkdir"):
        _load_legacy_rng(tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt: not an RNG state this project wrote"):
        load_rng(tmp_path / "evil.pt")  # a pickle where the safetensors state goes
    assert not marker.exists()


def test_a_truncated_pth_names_the_file_and_no_unsafe_option(tmp_path):
    path = tmp_path / "eva_vit_g.pth"
    torch.save({"model": {"w": torch.zeros(64, 64)}}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ValueError) as err:
        load_vision(path)
    message = str(err.value)
    assert message.startswith(f"{path}: not a complete PyTorch weights file (truncated") and "\n" not in message
    assert "pickle" not in message and "weights_only" not in message


def test_a_second_training_in_a_run_folder_is_refused_naming_the_holder(tmp_path):
    """The lock is held by this process; another process asking for it is refused at once, and gets it once
    it is released."""
    run_dir = tmp_path / "run"
    code = (
        "import sys\nfrom pathlib import Path\nfrom blip2_fast.train import RunFolderLock\n"
        "try:\n    RunFolderLock(Path(sys.argv[1])).acquire()\nexcept RuntimeError as err:\n    print(err)\n"
        "else:\n    print('acquired')\n"
    )

    def other_process() -> str:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(run_dir)], env=_env(), capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.strip()

    with RunFolderLock(run_dir) as lock:
        refused = other_process()
        with pytest.raises(RuntimeError, match="is in use by another training"):
            RunFolderLock(run_dir).acquire()  # another open of the lock file, in this process: refused too
    assert refused == (
        f"{run_dir} is in use by another training (pid {os.getpid()} on {socket.gethostname()}; lock {lock.path}); "
        "wait for it to end, or choose another train.name or train.output_dir"
    )
    assert lock.path.read_text() == ""  # no holder named once released
    assert other_process() == "acquired"  # (and a holder that dies frees it: it exits holding the lock)
    assert other_process() == "acquired"


@pytest.mark.slow
def test_a_refused_start_changes_nothing_and_runs_no_code(tmp_path):
    """One 2-step run (ZeRO-1: DeepSpeed writes a model file and an optimizer shard), then starts that must be
    refused, each leaving every file of the run folder byte-identical: a resume with another seed; a resume
    with a pickled payload planted in each file a resume reads (the payload never runs); a resume while
    another process holds the folder (stage 2's too); fresh runs whose config fails only once models are
    built."""
    marker = tmp_path / "payload-ran"
    common = TINY + [
        ("train.zero_stage", "1"),
        ("train.output_dir", str(tmp_path)),
        ("train.name", "run"),
        ("train.evaluate", "false"),
    ]
    checks = _train_in_subprocess(
        tmp_path,
        f"""
        import hashlib, os
        from pathlib import Path
        import torch
        from blip2_fast.train import RunFolderLock

        class Payload:
            def __init__(self, marker):
                self.marker = str(marker)

            def __reduce__(self):
                return os.mkdir, (self.marker,)

        common, marker = {common!r}, Path({str(marker)!r})
        run_dir = Path({str(tmp_path / "run")!r})

        def snapshot():
            files = sorted(p for p in run_dir.rglob("*") if p.is_file())
            return {{str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}}

        def refusal(overrides):
            try:
                run(load_config(None, common + overrides))
            except Exception as err:
                return str(err)
            return None

        run(load_config(None, common))
        before = snapshot()
        resume = [("train.resume", "true")]
        result = {{"seed": [refusal(resume + [("train.seed", "1")]), "", snapshot() == before]}}
        tag = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
        result["files"] = sorted(p.name for p in tag.iterdir())
        for f in sorted(tag.glob("*.pt")) + sorted(tag.glob("rng_rank*")):
            original = f.read_bytes()
            if f.suffix == ".pt":
                state = torch.load(f, weights_only=False)  # this run wrote it
                state["payload"] = Payload(marker)
                torch.save(state, f)
            else:
                torch.save({{"torch": Payload(marker)}}, f)  # a pickle where the RNG state goes
            planted = snapshot()
            result[f.name] = [refusal(resume), str(f), snapshot() == planted]
            f.write_bytes(original)
        rng = next(tag.glob("rng_rank*.safetensors"))  # a checkpoint of before: its RNG state pickled
        saved = rng.read_bytes()
        rng.unlink()
        legacy = rng.with_suffix(".pt")
        torch.save({{"torch": Payload(marker)}}, legacy)
        planted = snapshot()
        result["legacy"] = [refusal(resume), str(legacy), snapshot() == planted]
        legacy.unlink()
        rng.write_bytes(saved)
        assert snapshot() == before
        with RunFolderLock(run_dir):  # another training holds the folder
            result["locked"] = [refusal(resume), "in use by another training", snapshot() == before]
            from blip2_fast import train_stage2

            where = [("train.output_dir", str(run_dir.parent)), ("train.name", "run")]
            try:
                train_stage2.run(train_stage2.load_config(None, where))
                result["stage2_locked"] = [None, "", False]
            except RuntimeError as err:
                result["stage2_locked"] = [str(err), f"pid {{os.getpid()}}", snapshot() == before]
        # fresh runs: their config errors show only once the models are built
        missing = refusal([("train.deepspeed_config", "nowhere.json")])
        result["ds_json"] = [missing, "nowhere.json", snapshot() == before]
        cudagraphs = refusal([("train.compile", "inductor-cudagraphs")])
        result["compile"] = [cudagraphs, "needs a CUDA", snapshot() == before]
        result["marker"] = marker.exists()
        """,
    )
    assert checks.pop("marker") is False  # no payload ran
    files = checks.pop("files")
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in files and "mp_rank_00_model_states.pt" in files
    assert len([k for k in checks if k.endswith((".pt", ".safetensors"))]) == 3  # every file a resume reads
    for case, (message, named, unchanged) in checks.items():
        assert message and named in message and "\n" not in message, (case, message)
        assert unchanged, case
    assert "seed 0 -> 1" in checks["seed"][0]
