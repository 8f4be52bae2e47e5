"""The memory line of the prune summary: read from a plan's settings, memory figures and dtypes alike."""

from amprune.report import memory_summary

MEMORY = {"peak": {"rss": 3 * 2**30}, "model_bytes": 2**30, "hidden_bytes": 48 * 2**20, "hidden_place": "disk"}


def test_memory_line_names_ranks_and_the_compute_dtype_from_the_settings():
    settings = {"memory": MEMORY, "dtype": "bfloat16", "compute_dtype": "float32", "world_size": 2}
    assert memory_summary(settings) == (
        "peak memory: 3.00 GiB RSS · model 1.0 GiB · hidden states 48.0 MiB (disk) · 2 ranks\n"
        "note: layers computed in float32 (no fast bfloat16 kernels on this CPU)")


def test_one_process_in_its_stored_dtype_has_no_note():
    settings = {"memory": dict(MEMORY, peak={"rss": 2**30, "cuda": 2**29}), "dtype": "bfloat16",
                "compute_dtype": "bfloat16", "world_size": 1}
    assert memory_summary(settings) == (
        "peak memory: 1.00 GiB RSS, 0.50 GiB CUDA · model 1.0 GiB · hidden states 48.0 MiB (disk)")
