"""Imports a script of examples/ as a module, for the tests that run it (examples/ is neither a package nor
installed). Each call loads it afresh, so a test sees the script's module-level state as a user running it would."""
import importlib.util
import os

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name):
    """examples/<name>.py as a module named <name>_example."""
    spec = importlib.util.spec_from_file_location(f"{name}_example", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
