# Run:    lpjax train --config recipes/pod_lm.py --topology v5e:4x4 --compile-only --workdir runs/pod_lm_compile
#         (compile only, no TPU needed: pip install 'lpjax[tpu]'; BUILD_NOTES.md, "TPU pods without pods").
#         On a v5e-16 slice itself: lpjax train --config recipes/pod_lm.py --workdir runs/pod_lm
#         The ~8B model: --config.model.dim=4096 --config.model.depth=32 --config.model.heads=32
#         (with --topology v5e:16x16 --config.stages=16 --config.layout.data=16).
# Expect: compile-only on v5e:4x4: every program fits the 15.75 GiB a v5e chip offers; the step
#         program needs 9.51 GiB per device (peak 9.28 GiB + 243 MiB of code), the initial state
#         4.58 GiB (README, "Will it fit on my pod?"). Training itself is not measured: the corpus is
#         CPython's pydoc text (about 200 windows of 2048 bytes), a stand-in that only gives the shapes.
"""A ~1.2B-parameter byte-level pre-LN Transformer LM (width 2048, 24 blocks, 16 heads, 2048-byte context)
for a 16-chip TPU slice: chunked local updates over 4 stages x 4 data, streaming, on the SPMD executor."""

from lpjax.config.build import base_config


def get_config():
    config = base_config()
    config.dataset.name = "text_bytes"
    config.dataset.seq_len = 2048
    config.model.name = "transformer_lm"
    config.model.dim = 2048
    config.model.depth = 24
    config.model.heads = 16
    # Layer 0 is the token embedding, layers 1-24 the blocks: 4 stages of 7, 6, 6 and 6 layers.
    config.stages = 4
    config.method.name = "chunked"
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 3e-4
    config.schedule.name = "streaming"
    config.schedule.microbatches = 8
    config.layout.executor = "spmd"
    config.layout.data = 4
    config.batch_size = 32
    config.num_steps = 1000
    config.eval_batch_size = 32
    return config
