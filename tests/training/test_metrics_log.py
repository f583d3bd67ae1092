"""metrics.jsonl across runs that share it: a rerun or a resume leaves one curve, not two interleaved."""

import json

from sed_megatron.training.metrics import MetricsLog


def _iterations(path):
    with open(path) as f:
        return [json.loads(line)["iteration"] for line in f]


def _run(path, start, iterations):
    log = MetricsLog(str(path), tokens_per_iteration=8)
    log.start(start)
    for iteration in iterations:
        log.add({"lm loss": float(iteration)}, skipped=False)
        log.write(iteration, lr=1e-3, grad_norm=1.0)


def test_a_rerun_from_scratch_replaces_the_old_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _run(path, 0, [1, 5, 10, 15])
    _run(path, 0, [1, 5, 10])
    assert _iterations(path) == [1, 5, 10]
    with open(path) as f:
        assert [json.loads(line)["loss"] for line in f] == [1.0, 5.0, 10.0]


def test_a_resume_keeps_the_records_up_to_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _run(path, 0, [1, 5, 10, 15])
    with open(path, "a") as f:
        f.write('{"iteration": 2')  # a line cut short by a kill
    _run(path, 10, [15, 20])  # resumed from the checkpoint of iteration 10
    assert _iterations(path) == [1, 5, 10, 15, 20]


def test_a_rank_that_never_writes_leaves_the_file_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _run(path, 0, [1, 5])
    MetricsLog(str(path), tokens_per_iteration=8).start(0)  # started, no record (not the writing rank)
    assert _iterations(path) == [1, 5]
