#!/usr/bin/env python3
"""Replace one marked section of a Markdown file with stdin.

Usage: scripts/md-section.py FILE NAME  < new-section-text

The section is the text between the lines

    <!-- NAME:begin -->
    <!-- NAME:end -->

which are kept; everything else in FILE is left byte for byte as it was. When FILE
does not exist it is created with a `# Benchmarks` heading; when it has no such
section, the marked section is appended at its end. Several scripts can so each own
one section of one document. The file is replaced atomically (temporary file +
rename). Exits non-zero, leaving FILE untouched, when the markers are unbalanced,
repeated or out of order.
"""

import os
import re
import sys
import tempfile

DEFAULT_HEADING = "# Benchmarks\n"


def die(msg: str) -> None:
    sys.stderr.write(f"md-section: error: {msg}\n")
    sys.exit(1)


def main() -> None:
    if len(sys.argv) != 3:
        sys.stderr.write(__doc__.split("\n\n")[1] + "\n")
        sys.exit(2)
    path, name = sys.argv[1], sys.argv[2]
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        die(f"section name {name!r}: only letters, digits, '_', '.', '-'")
    body = sys.stdin.read()
    if body and not body.endswith("\n"):
        body += "\n"
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n{body}{end}\n"

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        text = None

    if text is None:
        new = f"{DEFAULT_HEADING}\n{section}"
    else:
        # Markers count only as whole lines (surrounding blanks allowed).
        b = [m for m in re.finditer(rf"^[ \t]*{re.escape(begin)}[ \t]*\n?", text, re.M)]
        e = [m for m in re.finditer(rf"^[ \t]*{re.escape(end)}[ \t]*(\n|$)", text, re.M)]
        if not b and not e:
            if text and not text.endswith("\n"):
                text += "\n"
            sep = "" if not text else ("\n" if not text.endswith("\n\n") else "")
            new = f"{text}{sep}{section}"
        elif len(b) == 1 and len(e) == 1 and b[0].end() <= e[0].start():
            new = text[: b[0].start()] + section + text[e[0].end():]
        else:
            die(
                f"{path}: section {name!r} has {len(b)} begin and {len(e)} end "
                "marker(s), or they are out of order; fix the file by hand"
            )

    if text == new:
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".md-section.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new)
        if text is not None:
            st = os.stat(path)
            os.chmod(tmp, st.st_mode & 0o7777)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


if __name__ == "__main__":
    main()
