"""XLA options that make the tests' tiny programs compile several times faster on CPU.

Their run time is negligible either way: no backend optimisation, classic emitters. Only the options
this XLA knows are used, so a future XLA that drops one still runs the tests.
"""
import jax


def _fast_compile_options() -> dict:
    usable = {}
    for name, value in (("xla_backend_optimization_level", 0), ("xla_cpu_use_fusion_emitters", False)):
        try:
            jax.jit(lambda x: x + 1, compiler_options={**usable, name: value}).lower(1.0).compile()
            usable[name] = value
        except Exception:  # an XLA without this option
            pass
    return usable


FAST = _fast_compile_options()
