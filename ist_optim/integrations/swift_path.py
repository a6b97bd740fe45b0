"""Print the ms-swift plugin file's path for ``--external_plugins``.

Usage: ``python -m ist_optim.integrations.swift_path``.
"""

from pathlib import Path

if __name__ == "__main__":
    print(Path(__file__).with_name("swift_plugin.py"))
