"""The benchmark harness (`python -m bench`): interleaving, ratios, isolated runs, same-weight model pairs."""

from __future__ import annotations

import torch

from bench.fixtures import build_ours, chat_batch, native_inputs, to_native
from bench.harness import Row, interleaved, isolated


def test_interleaved_rotates_the_order_and_times_every_repeat():
    calls = []
    timings = interleaved({name: (lambda name=name: calls.append(name)) for name in "abc"}, repeats=3, warmup=1)
    assert calls == ["a", "b", "c", *"abc", *"bca", *"cab"]
    assert all(len(t.walls) == len(t.cpus) == 3 for t in timings.values())


def test_ratio_is_ours_over_native_time_for_times_and_speeds():
    assert Row("t", "ms", ours=5.0, native=10.0, cpu_wall=2.0).ratio == 0.5
    assert Row("s", "tokens/s", ours=20.0, native=10.0, cpu_wall=2.0, higher_is_better=True).ratio == 0.5


def test_native_twin_has_our_weights():
    ours, processor = build_ours("tiny")
    native = to_native(ours)
    inputs = chat_batch(processor, 2)
    with torch.no_grad():
        expected = ours(**inputs).logits
        got = native(**native_inputs(inputs, ours)).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_isolated_training_step_reports_time_and_peak_memory():
    result = isolated("bench.training:step_case", config="tiny", native=False, checkpointing=True, steps=1, warmup=0)
    assert result["step_s"] > 0 and result["peak_rss_mib"] >= result["rss_before_mib"] > 0


def test_sft_encoding_bench_checks_both_label_paths_agree(capsys):
    from bench.sft_encoding import main

    main(["--records", "6", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "labels identical" in out and "6 dialogues" in out and "Speed-up: **" in out
