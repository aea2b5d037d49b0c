"""Quickstart experiment: logistic regression on synthetic fraud-like data, standard library only.

Reads the directories ep-runner gives it (EP_OUTPUT_DIR, EP_CHECKPOINT_DIR, EP_PROGRESS_FILE) and
falls back to ./out when run by hand. Writes a checkpoint every epoch, then progress.json naming it,
and results.json with f1 and auc computed from its own predictions on a held-out split. Given
EP_RESUME_FROM (an earlier attempt's checkpoint, with checkpoints.resume), it starts after that epoch.
"""
import argparse
import json
import math
import os
import random
import time


def synthetic(n, dim, rng):
    """Two Gaussian classes, ~20% positives, overlapping enough that the scores are not perfect."""
    true_w = [rng.uniform(-1.5, 1.5) for _ in range(dim)]
    rows = []
    for _ in range(n):
        x = [rng.gauss(0.0, 1.0) for _ in range(dim)]
        z = sum(w * v for w, v in zip(true_w, x)) - 1.4 + rng.gauss(0.0, 1.0)
        rows.append((x, 1 if z > 0 else 0))
    return rows


def sigmoid(z):
    if z < -35:
        return 0.0
    if z > 35:
        return 1.0
    return 1.0 / (1.0 + math.exp(-z))


def auc(scores, labels):
    """Probability that a random positive outranks a random negative (ties count half)."""
    pairs = sorted(zip(scores, labels))
    pos = sum(labels)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return 0.5
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        avg_rank = (i + 1 + j) / 2.0
        rank_sum += avg_rank * sum(1 for k in range(i, j) if pairs[k][1] == 1)
        i = j
    return (rank_sum - pos * (pos + 1) / 2.0) / (pos * neg)


def f1(preds, labels):
    tp = sum(1 for p, y in zip(preds, labels) if p and y)
    fp = sum(1 for p, y in zip(preds, labels) if p and not y)
    fn = sum(1 for p, y in zip(preds, labels) if not p and y)
    if tp == 0:
        return 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


def write_json(path, value):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--epoch-sleep", type=float, default=0.0, help="seconds to pause per epoch (to watch heartbeats)")
    args = ap.parse_args()

    out = os.environ.get("EP_OUTPUT_DIR", "out")
    ckpt = os.environ.get("EP_CHECKPOINT_DIR", os.path.join(out, "checkpoints"))
    progress = os.environ.get("EP_PROGRESS_FILE", os.path.join(out, "progress.json"))
    for d in (out, ckpt, os.path.dirname(progress) or "."):
        os.makedirs(d, exist_ok=True)

    rng = random.Random(args.seed)
    data = synthetic(args.samples, args.dim, rng)
    split = int(len(data) * 0.8)
    train, test = data[:split], data[split:]
    w, b, first = [0.0] * args.dim, 0.0, 1
    resume = os.environ.get("EP_RESUME_FROM")
    if resume:
        with open(resume) as f:
            saved = json.load(f)
        w, b, first = saved["w"], saved["b"], saved["epoch"] + 1
        print(f"resuming from epoch {saved['epoch']} ({resume})", flush=True)
    for epoch in range(first, args.epochs + 1):
        gw, gb, loss = [0.0] * args.dim, 0.0, 0.0
        for x, y in train:
            p = sigmoid(sum(wi * xi for wi, xi in zip(w, x)) + b)
            err = p - y
            for k in range(args.dim):
                gw[k] += err * x[k]
            gb += err
            loss -= y * math.log(max(p, 1e-12)) + (1 - y) * math.log(max(1 - p, 1e-12))
        n = len(train)
        w = [wi - args.lr * g / n for wi, g in zip(w, gw)]
        b -= args.lr * gb / n
        name = f"epoch-{epoch:03d}.json"
        write_json(os.path.join(ckpt, name), {"epoch": epoch, "w": w, "b": b})
        # Named only once it is in place: a later attempt may resume from it.
        write_json(progress, {"step": epoch, "total": args.epochs, "metrics": {"loss": loss / n}, "checkpoint": name})
        print(f"epoch {epoch}/{args.epochs} loss {loss / n:.4f}", flush=True)
        if args.epoch_sleep:
            time.sleep(args.epoch_sleep)

    scores = [sigmoid(sum(wi * xi for wi, xi in zip(w, x)) + b) for x, _ in test]
    labels = [y for _, y in test]
    results = {
        "f1": round(f1([s >= 0.5 for s in scores], labels), 6),
        "auc": round(auc(scores, labels), 6),
        "epochs": args.epochs,
        "test_samples": len(test),
    }
    write_json(os.path.join(out, "results.json"), results)
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
