# The package metadata lives in pyproject.toml. setup.py exists because
# setuptools takes CFFI's build hook (cffi_modules) only as a setup() argument,
# and to ship the top-level schema.sql inside the package.
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py


class BuildPyWithSchema(build_py):
    def run(self):
        super().run()
        shutil.copy("schema.sql", Path(self.build_lib) / "sqlgpt" / "schema.sql")


class BuildExtWithSqlite(build_ext):
    """The CFFI kernel, then the loadable SQLite extension beside it."""

    def run(self):
        super().run()
        import importlib.util  # build_ext.py by its path: the source folder may not be on sys.path
        spec = importlib.util.spec_from_file_location("sqlgpt_builder",
                                                      Path(__file__).parent / "build_ext.py")
        builder = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(builder)
        target = Path("sqlgpt") if self.inplace else Path(self.build_lib) / "sqlgpt"
        target.mkdir(parents=True, exist_ok=True)
        builder.build_sqlite_extension(target / builder.EXTENSION,
                                       Path(self.build_temp) / "sqlite_ext")


setup(cffi_modules=["build_ext.py:ffibuilder"],
      cmdclass={"build_py": BuildPyWithSchema, "build_ext": BuildExtWithSqlite})
