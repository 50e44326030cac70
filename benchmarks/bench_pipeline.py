"""Print seconds per stage and peak memory of the pipeline on a set of images.

Usage:
    python benchmarks/bench_pipeline.py --vlm MODEL [--llm MODEL] [--detector MODEL|none]
        [--scorer MODEL|none] [--max-new-tokens N] [--device auto] IMAGE...

Speed and memory are measured here, never asserted in tests: the machines that run the tests
are shared and their timings are noisy.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

from patch_matters_core.config import PipelineConfig
from patch_matters_core.pipeline import PatchMatters


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--vlm", required=True)
    parser.add_argument("--llm")
    parser.add_argument("--detector", default="none")
    parser.add_argument("--scorer", default="none")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    config = PipelineConfig().with_samples(args.samples)
    if args.max_new_tokens:
        config = config.with_max_new_tokens(args.max_new_tokens)

    def optional(value):
        return None if value is None or value.lower() == "none" else value

    load_start = time.perf_counter()
    pipeline = PatchMatters.from_sources(
        vlm=args.vlm,
        llm=optional(args.llm),
        detector=optional(args.detector),
        scorer=optional(args.scorer),
        device=args.device,
        dtype=args.dtype,
        config=config,
    )
    print(f"load: {time.perf_counter() - load_start:.1f} s, peak RSS {peak_rss_mib():.0f} MiB")

    per_stage: dict[str, list[float]] = {}
    for image in args.images:
        trace = pipeline.run(image)
        for stage, seconds in trace.timings.items():
            per_stage.setdefault(stage, []).append(seconds)
        print(
            f"{image.name}: {trace.timings['total']:.1f} s, {len(trace.caption.split())} words, "
            f"{len(trace.fallbacks)} fallbacks"
        )

    print(f"{'stage':<16}{'mean s':>10}{'max s':>10}")
    for stage, values in per_stage.items():
        print(f"{stage:<16}{statistics.mean(values):>10.2f}{max(values):>10.2f}")
    print(f"images: {len(args.images)}, peak RSS {peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
