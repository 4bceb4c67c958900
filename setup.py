# The package metadata lives in pyproject.toml. setup.py exists because
# setuptools takes CFFI's build hook (cffi_modules) only as a setup() argument,
# and to ship the top-level schema.sql inside the package.
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithSchema(build_py):
    def run(self):
        super().run()
        shutil.copy("schema.sql", Path(self.build_lib) / "sqlgpt" / "schema.sql")


setup(cffi_modules=["build_ext.py:ffibuilder"], cmdclass={"build_py": BuildPyWithSchema})
