"""Exit 0 when every requirement in the given -r files is installed at a satisfying version."""

import sys
from importlib import metadata

from packaging.requirements import Requirement


def requirements(paths):
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                if line:
                    yield Requirement(line)


def main(argv):
    paths = [a for a in argv if a != "-r"]
    missing = []
    for req in requirements(paths):
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(str(req))
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            missing.append(f"{req} (have {version})")
    for m in missing:
        print("missing:", m)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
