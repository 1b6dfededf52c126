"""Command-line options shared by the pipeline benchmarks (no JAX import: workers set XLA flags first)."""


def add_size_arguments(parser):
    """The model and timing options both pipeline benchmarks take."""
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2, help="dense layers per stage")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--microbatch", type=int, default=512, help="examples per microbatch")
    parser.add_argument("--microbatches", type=int, default=4, help="M: microbatches per optimizer step")
    parser.add_argument("--steps", type=int, default=8, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile + pipeline fill)")
