"""The experiments' resumable steps (sed_megatron/pipeline.py): what a rerun skips and what it redoes."""

import json

from sed_megatron import pipeline


def test_cached_json_computes_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"tau": 0.5}

    path = tmp_path / "tau.json"
    assert pipeline.cached_json(str(path), compute) == {"tau": 0.5}
    assert pipeline.cached_json(str(path), compute) == {"tau": 0.5}
    assert len(calls) == 1 and json.loads(path.read_text()) == {"tau": 0.5}


def test_train_skips_only_a_checkpoint_of_the_asked_iteration(tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(pipeline, "torchrun", lambda *args, **kwargs: launched.append(args))
    save = tmp_path / "ckpt"
    assert not pipeline.trained_to(str(save), 10)
    pipeline.train(str(tmp_path), "run", "run.yaml", "init", str(save), resume_iters=10)
    assert len(launched) == 1  # nothing there: it trains

    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("5\n")  # an earlier save, not the last one
    pipeline.train(str(tmp_path), "run", "run.yaml", "init", str(save), resume_iters=10)
    assert len(launched) == 2

    (save / "latest_checkpointed_iteration.txt").write_text("10\n")
    assert pipeline.trained_to(str(save), 10)
    assert pipeline.train(str(tmp_path), "run", "run.yaml", "init", str(save), resume_iters=10) == str(save)
    assert len(launched) == 2  # finished: skipped
    pipeline.train(str(tmp_path), "run", "run.yaml", "init", str(save))
    assert len(launched) == 3  # without resume_iters every call trains
