"""The repo's source folders never shadow an installed package of the same name under pytest."""

import importlib.metadata
import sys

from tests.conftest import shadowing_folders


def test_installed_packages_win_over_repo_folders():
    checked = 0
    for folder in shadowing_folders():
        module = sys.modules.get(folder.name)
        assert module is not None, f"installed package {folder.name!r} was not imported ahead of {folder}"
        assert not module.__file__.startswith(f"{folder}/"), (
            f"{folder.name!r} resolves to the repo folder {module.__file__}, not the installed package"
        )
        checked += 1
    # transformers >= 5.x pulls in Hugging Face's `kernels`, the one clash seen so far.
    if any(d.metadata["Name"] == "kernels" for d in importlib.metadata.distributions()):
        assert checked >= 1
