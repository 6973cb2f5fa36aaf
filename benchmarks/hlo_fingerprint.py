"""Fingerprints of the compiled training step of each norm: a before/after check that needs no quiet machine.

Timings on a shared CPU move by tens of percent between runs; the program XLA
compiles does not. This prints, for the gradient of a loss through each norm
(x, scale and bias; the functional norms and the linen layers the bench
runs), a hash of the optimized HLO with instruction names, metadata and
strings removed, and its instruction and fusion counts. Run it
on two commits: equal hashes mean the same compiled program, hence the same
speed, whatever the timings say.

    python benchmarks/hlo_fingerprint.py            # on this machine's default backend
    python benchmarks/hlo_fingerprint.py --dump DIR  # also writes each normalized program for diff
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import re

import jax
import jax.numpy as jnp

import jaxnorm as jn
import jaxnorm.linen as jnl


def normalized(text: str) -> list[str]:
    """The instructions of an HLO module, names and metadata removed, sorted (order-free)."""
    text = re.sub(r", metadata=\{[^}]*\}", "", text)
    text = re.sub(r'"[^"]*"', "", text)
    return sorted(re.sub(r"%[\w.\-]+", "%", line.strip()) for line in text.splitlines() if " = " in line)


def cases() -> dict:
    k = jax.random.split(jax.random.key(0), 2)
    x, x4 = jax.random.normal(k[0], (256, 512)), jax.random.normal(k[1], (8, 8, 8, 64))
    w, w4 = jnp.cos(x), jnp.cos(x4)
    s, b, s4, b4 = jnp.ones(512), jnp.zeros(512), jnp.ones(64), jnp.zeros(64)
    stats = jn.init_batch_stats(512)

    def bn(x, s, b):
        return jn.batch_norm(x, stats, s, b, training=True)[0]

    def linen(layer):
        """A linen layer's training step (batch statistics updated), as the bench runs it."""
        variables = layer.init(jax.random.key(0), x4)

        def loss(x, s, b):
            out, _ = layer.apply({**variables, "params": {"scale": s, "bias": b}}, x, mutable=["batch_stats"])
            return jnp.sum(out * w4)

        return loss

    return {
        "layer_norm": (lambda x, s, b: jnp.sum(jn.layer_norm(x, s, b) * w), (x, s, b)),
        "layer_norm masked": (lambda x, s, b: jnp.sum(jn.layer_norm(x, s, b, mask=x > -1) * w), (x, s, b)),
        "rms_norm": (lambda x, s, b: jnp.sum(jn.rms_norm(x, s) * w), (x, s, b)),
        "batch_norm": (lambda x, s, b: jnp.sum(bn(x, s, b) * w), (x, s, b)),
        "batch_norm bf16": (lambda x, s, b: jnp.sum(bn(x.astype(jnp.bfloat16), s, b) * w), (x, s, b)),
        "group_norm": (lambda x, s, b: jnp.sum(jn.group_norm(x, s, b, num_groups=8) * w4), (x4, s4, b4)),
        "linen BatchNorm": (linen(jnl.BatchNorm(use_running_average=False)), (x4, s4, b4)),
        "linen BatchRenorm": (linen(jnl.BatchRenorm(use_running_average=False)), (x4, s4, b4)),
        "linen LayerNorm": (linen(jnl.LayerNorm()), (x4, s4, b4)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", type=pathlib.Path, help="write each normalized program here")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, jaxnorm from {pathlib.Path(jn.__file__).parent}, {jax.default_backend()}")
    print("| case | hash | instructions | fusions |\n|---|---|---|---|")
    for name, (loss, operands) in cases().items():
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*operands).compile().as_text()
        lines = normalized(text)
        digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]
        print(f"| {name} | {digest} | {len(lines)} | {sum('fusion(' in line for line in lines)} |")
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            (args.dump / f"{name.replace(' ', '_')}.txt").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
