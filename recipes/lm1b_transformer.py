# Run:    lpjax train --config recipes/lm1b_transformer.py --config.dataset.data_dir=~/tensorflow_datasets --workdir runs/lm1b_transformer
#         (prepare LM1B once first: BUILD_NOTES.md, "Real datasets"; the first run also measures the
#         30 million training sentences once for packing, some minutes, then caches the result).
#         With 4 accelerators, one stage per device: --config.layout.executor=mpmd
#         --config.schedule.name=streaming --config.schedule.microbatches=4
# Expect: not measured yet. Laskin et al. (arXiv 2012.03837) report their Transformer language models
#         as compute-efficiency curves (time and compute to a target training loss), not as a table;
#         no local-learning paper we checked reports byte-level LM1B.
#         Compare against the same recipe with --config.method.name=backprop.
"""A byte-level pre-LN Transformer LM (8 blocks, width 512, 8 heads) on LM1B, sentences packed into
256-byte windows, overlapping local updates (window 2) over 4 stages: the token embedding rides with
the first two blocks (3, 2, 2, 2 layers)."""

from ml_collections.config_dict import placeholder

from lpjax.config.build import base_config


def get_config():
    config = base_config()
    config.dataset.name = "lm1b"
    config.dataset.data_dir = placeholder(str)  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.dataset.seq_len = 256
    config.dataset.max_train = placeholder(int)  # None: every training sentence
    config.dataset.cache_dir = placeholder(str)  # None: <data_dir>/lpjax_cache (packing's sentence lengths)
    config.dataset.read_threads = placeholder(int)  # None: the loader's default
    config.model.name = "transformer_lm"
    config.model.dim = 512
    config.model.depth = 8
    config.model.heads = 8
    config.stages = 4
    config.method.name = "overlapping"
    config.method.window = 2
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 6e-4
    config.optimizer.weight_decay = 0.1
    config.optimizer.decay = "cosine"
    config.optimizer.warmup_steps = 2000
    config.optimizer.grad_clip_norm = 1.0
    config.batch_size = 256
    config.num_steps = 100_000
    config.log_every = 200
    config.eval_every = 10_000
    config.eval_batch_size = 256
    return config
