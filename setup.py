# Pure-Python for now; the kernels issue adds the CUDA extension build here.
from setuptools import setup

setup()
