"""Benchmark of flwr_ext.compression: bytes, entropy-coder efficiency, speed, accuracy.

Everything is measured in one run and printed side by side:

1. Uplink bytes per preset for a real DigitsCNN update (one local epoch on scikit-learn digits
   from the initial model), measured with ``ArrayRecord.count_bytes()`` exactly as the server
   counts them, against the raw float32 ArrayRecord.
2. The entropy stage against the empirical (order-0) entropy of the streams it codes.
3. Encode + decode time of a 4M-float update per preset against zstandard level 3 on the raw
   float32 bytes (median of repeats, same process).
4. Our 1-D k-means against scikit-learn's KMeans on the values FedZip clusters.
5. (unless --no-accuracy) a short in-process FedAvg on DigitsCNN per preset: accuracy and
   cumulative uplink bytes after the same number of updates, for plain-SGD and momentum-SGD
   clients, each with the plain mean and with the support mean of sparse deltas.

Run: ``.venv/bin/python bench/bench_compression.py [--rounds 15] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch
import zstandard
from flwr.app import Array, ArrayRecord

from flwr_ext.compression import CompressionState, compress, decode_tensor, get_preset
from flwr_ext.compression.codec import encode_update, is_sparse_payload
from flwr_ext.compression.entropy import _gap_symbols, encode_symbols
from flwr_ext.compression.quantize import kmeans_1d
from flwr_ext.compression.server import support_mean
from flwr_ext.compression.sparsify import k_for, topk_indices
from flwr_ext.compression.wire import Writer

PRESETS = ("none", "fedzip", "fedzip:dense_below=0", "dgc", "qsgd-8bit")
W = 22  # width of the preset column


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _model():
    from flwr_ext.vision.model import DigitsCNN

    torch.manual_seed(0)
    return DigitsCNN()


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _load(model, arrays: dict[str, np.ndarray]) -> None:
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in arrays.items()})


def _local(
    model, x, y, epochs: int = 1, seed: int = 0, momentum: float = 0.0, batch_size: int = 32
) -> None:
    from flwr_ext.vision.train import train_local

    train_local(
        model, x, y, epochs=epochs, lr=0.05, seed=seed, momentum=momentum, batch_size=batch_size
    )


def _record_bytes(payloads: dict[str, bytes], update: dict[str, np.ndarray], stype: str) -> int:
    rec = ArrayRecord(
        {
            k: Array(
                dtype=str(update[k].dtype),
                shape=tuple(update[k].shape),
                stype=stype,
                data=payloads[k],
            )
            for k in update
        }
    )
    return rec.count_bytes()


def _raw_bytes(update: dict[str, np.ndarray]) -> int:
    return ArrayRecord({k: Array(v) for k, v in update.items()}).count_bytes()


def _entropy_bits(symbols: np.ndarray) -> float:
    if symbols.size == 0:
        return 0.0
    p = np.bincount(symbols) / symbols.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum() * symbols.size)


def section_bytes(update: dict[str, np.ndarray]) -> None:
    n = sum(v.size for v in update.values())
    raw = _raw_bytes(update)
    print(f"\n[1] uplink bytes, DigitsCNN update ({n} floats, one local epoch on digits)")
    print(f"    raw float32 ArrayRecord.count_bytes(): {raw} B (float data {4 * n} B)")
    print(f"    {'preset':<{W}}{'bytes':>10}{'ratio vs raw':>15}{'rel. L2 error':>15}")
    for name in PRESETS[1:]:
        cfg = get_preset(name)
        payloads, recon = encode_update(update, cfg, seed=1)
        nbytes = _record_bytes(payloads, update, cfg.stype)
        num = sum(float(np.sum((recon[k] - update[k]) ** 2)) for k in update)
        den = sum(float(np.sum(update[k] ** 2)) for k in update)
        print(f"    {name:<{W}}{nbytes:>10}{raw / nbytes:>14.1f}x{np.sqrt(num / den):>15.3f}")


def section_entropy(x: np.ndarray, density: float) -> None:
    print(f"\n[2] entropy stage vs empirical entropy ({x.size} floats, top-k density {density})")
    idx = topk_indices(x, k_for(x.size, density))
    gaps = np.diff(idx, prepend=-1)
    sym, nb, _ = _gap_symbols(gaps)
    _, labels = kmeans_1d(x[idx], 3)
    qcfg = get_preset("qsgd-8bit")
    from flwr_ext.compression.quantize import qsgd_quantize

    _, qsym = qsgd_quantize(x[: 1 << 20], qcfg.levels, qcfg.bucket, np.random.default_rng(0))
    rows = []
    for label, stream in (
        ("k-means ids (3)", labels),
        ("gap buckets", sym),
        ("QSGD levels (1M)", qsym),
    ):
        w = Writer()
        encode_symbols(stream, w)
        coded = len(w.getvalue()) * 8
        rows.append((label, stream.size, coded, _entropy_bits(stream)))
    extra = int(nb.sum())
    w = Writer()
    encode_symbols(sym, w)
    gap_coded = len(w.getvalue()) * 8 + (extra + 7) // 8 * 8
    rows.append(("gaps total", gaps.size, gap_coded, _entropy_bits(sym) + extra))
    print(f"    {'stream':<18}{'n':>9}{'coded bits':>12}{'n*H bits':>12}{'coded/H':>9}")
    for label, n, coded, h in rows:
        print(f"    {label:<18}{n:>9}{coded:>12}{h:>12.0f}{coded / h:>9.3f}")
    h_gap = _entropy_bits(gaps)
    print(
        f"    (order-0 entropy of the gap *values* themselves, {np.unique(gaps).size} distinct:"
        f" {h_gap:.0f} bits -> gaps total / that = {gap_coded / h_gap:.3f})"
    )


def _median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def section_speed(x: np.ndarray, repeats: int) -> None:
    raw = x.tobytes()
    zc = zstandard.ZstdCompressor(level=3)
    z = zc.compress(raw)
    t_zc = _median_time(lambda: zc.compress(raw), repeats)
    t_zd = _median_time(lambda: zstandard.ZstdDecompressor().decompress(z), repeats)
    print(f"\n[3] encode+decode time, {x.size} floats (median of {repeats})")
    print(
        f"    zstd-3 compress {t_zc * 1e3:.1f} ms, decompress {t_zd * 1e3:.1f} ms, "
        f"ratio {len(raw) / len(z):.3f}x"
    )
    print(
        f"    {'preset':<{W}}{'enc ms':>9}{'dec ms':>9}{'enc+dec ms':>12}"
        f"{'/ zstd-c':>10}{'/ zstd c+d':>12}{'ratio':>9}"
    )
    upd = {"w": x}
    for name in PRESETS[1:]:
        cfg = get_preset(name)
        # as the client mod encodes: the reconstruction only when error feedback needs it
        payloads, _ = encode_update(upd, cfg, seed=1)
        rec = cfg.error_feedback
        t_e = _median_time(
            lambda cfg=cfg, rec=rec: encode_update(upd, cfg, seed=1, reconstruct=rec), repeats
        )
        p = payloads["w"]
        t_d = _median_time(lambda p=p: decode_tensor(p, expected_shape=x.shape), repeats)
        tot = t_e + t_d
        print(
            f"    {name:<{W}}{t_e * 1e3:>9.1f}{t_d * 1e3:>9.1f}{tot * 1e3:>12.1f}"
            f"{tot / t_zc:>10.2f}{tot / (t_zc + t_zd):>12.2f}{len(raw) / len(p):>8.0f}x"
        )


def section_kmeans(values: np.ndarray) -> None:
    from sklearn.cluster import KMeans

    print(f"\n[4] 1-D k-means, 3 clusters on {values.size} top-k values")
    t_ours = _median_time(lambda: kmeans_1d(values, 3), 5)
    cb, lab = kmeans_1d(values, 3)
    inertia = float(np.sum((values - cb[lab]) ** 2))
    km = KMeans(3, n_init=1, random_state=0)
    t_sk = _median_time(lambda: km.fit(values.reshape(-1, 1).astype(np.float64)), 3)
    print(
        f"    ours: {t_ours * 1e3:.2f} ms inertia {inertia:.6g} | sklearn KMeans(n_init=1): "
        f"{t_sk * 1e3:.1f} ms inertia {km.inertia_:.6g} | speed-up {t_sk / t_ours:.0f}x"
    )


def section_accuracy(
    rounds: int,
    clients: int,
    sparse_mean: bool = False,
    momentum: float = 0.0,
    batch_size: int = 32,
) -> None:
    from flwr_ext.vision.train import evaluate

    torch.set_num_threads(1)
    xtr, ytr, xte, yte = _digits()
    print(
        f"\n[5] in-process FedAvg on DigitsCNN: {clients} IID clients, 1 local epoch, "
        f"{rounds} rounds (= {rounds * clients} updates), "
        f"{'support-mean' if sparse_mean else 'plain mean'} of sparse deltas, "
        f"client SGD momentum {momentum} batch {batch_size}"
    )
    print(f"    {'preset':<{W}}{'accuracy':>10}{'uplink bytes':>14}{'vs none':>10}")
    base_bytes = None
    base_acc = None
    for name in PRESETS:
        cfg = get_preset(name)
        model = _model()
        glob = _state(model)
        states = [CompressionState(cfg) if cfg else None for _ in range(clients)]
        up = 0
        for rnd in range(1, rounds + 1):
            deltas, sparse = [], []
            for c in range(clients):
                _load(model, glob)
                _local(
                    model,
                    xtr[c::clients],
                    ytr[c::clients],
                    seed=rnd * 100 + c,
                    momentum=momentum,
                    batch_size=batch_size,
                )
                new = _state(model)
                delta = {k: new[k] - glob[k] for k in glob}
                if cfg is None:
                    up += _raw_bytes({k: v for k, v in new.items()})
                    deltas.append(delta)
                    continue
                payloads = compress(states[c], delta, server_round=rnd, seed=rnd * 1000 + c)
                up += _record_bytes(payloads, delta, cfg.stype)
                deltas.append({k: decode_tensor(payloads[k]) for k in delta})
                sparse.append({k for k, p in payloads.items() if is_sparse_payload(p)})
            if sparse_mean and cfg is not None:  # as Compressed(FedAvg, sparse_mean=True)
                deltas = support_mean(deltas, sparse, [1.0] * clients)
            glob = {
                k: glob[k] + np.mean([d[k] for d in deltas], axis=0).astype(glob[k].dtype)
                for k in glob
            }
        _load(model, glob)
        _, acc = evaluate(model, xte, yte)
        base_bytes = base_bytes or up
        base_acc = acc if base_acc is None else base_acc
        print(
            f"    {name:<{W}}{acc:>10.4f}{up:>14}{base_bytes / up:>9.1f}x"
            f"   (acc - none: {100 * (acc - base_acc):+.1f} points)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and rounds")
    ap.add_argument("--no-accuracy", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.repeats = 5, 3
    torch.set_num_threads(1)

    xtr, ytr, _, _ = _digits()
    model = _model()
    before = _state(model)
    _local(model, xtr[:350], ytr[:350])
    update = {k: _state(model)[k] - before[k] for k in before}
    section_bytes(update)

    big = np.random.default_rng(0).standard_normal(4_000_000).astype(np.float32)
    print("    (the 4M-float sections use a synthetic Gaussian update)")
    section_entropy(big, 0.01)
    section_speed(big, args.repeats)
    section_kmeans(big[topk_indices(big, 40_000)].astype(np.float64))
    if not args.no_accuracy:
        # plain-SGD clients (the first version of this bench) and momentum-SGD clients as in
        # apps/async-vision (lr 0.05, momentum 0.9, batch 16); each with FedAvg's plain mean
        # and with Compressed(sparse_mean=True)'s support mean
        for momentum, batch in ((0.0, 32), (0.9, 16)):
            for sparse_mean in (False, True):
                section_accuracy(args.rounds, args.clients, sparse_mean, momentum, batch)


if __name__ == "__main__":
    main()
