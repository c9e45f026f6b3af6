"""The C fast path of the engine (policy/_wirefilter.c), built where a C compiler is present.

optional=True: without a compiler the build goes on and the engine runs its Python path
alone (same results, slower). Everything else is configured in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "telemetry_guard.policy._wirefilter",
            sources=["policy/_wirefilter.c"],
            optional=True,
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
        )
    ]
)
