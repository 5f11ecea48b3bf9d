"""Build: the Python packages plus the C++17 extension atesd_mc._native through CMake.

The top-level kernels/ folder installs as atesd_mc.kernels (package_dir mapping): a top-level
`kernels` package would clash with an unrelated PyPI project. Set ATESD_SKIP_NATIVE=1 to skip the
extension; atesd_mc.packing then uses its pure-Python fallback (identical output)."""
import os
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = os.path.abspath(os.path.dirname(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        os.makedirs(build_dir, exist_ok=True)
        subprocess.check_call([
            "cmake", HERE, f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython3_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release"], cwd=build_dir)
        subprocess.check_call(["cmake", "--build", build_dir, "-j2"], cwd=build_dir)


ext_modules = [] if os.environ.get("ATESD_SKIP_NATIVE") == "1" else [CMakeExtension("atesd_mc._native")]

setup(
    name="atesd-mc",
    version="0.1.0",
    description="Adaptive Teacher Exposure Self-Distillation on megatron-core",
    python_requires=">=3.10",
    packages=["atesd_mc", "atesd_mc.model", "atesd_mc.data", "atesd_mc.exposure", "atesd_mc.kernels"],
    package_dir={"atesd_mc": "atesd_mc", "atesd_mc.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        # The CPU 2.13.0 wheel satisfies this range; install with torch pinned in the same command.
        "torch>=2.6,<2.15",
        "megatron-core>=0.16.1,<0.20",
        "triton>=3.2",
        "numpy>=1.26",
        "pyyaml>=6",
        "tqdm>=4.60",
        "sentencepiece>=0.2",
        "zarr>=3.0",
        "psutil>=5.9",  # undeclared runtime dependency of megatron dist_checkpointing
    ],
    extras_require={
        "test": ["pytest>=8"],
        "hf": ["transformers>=4.51", "safetensors>=0.4", "tokenizers>=0.21", "peft>=0.21"],
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        "eval": ["math-verify>=0.7"],
    },
)
