"""One bad-input case is one line of data: :class:`C` (family, name, argv, expected fragment, files).

``argv`` is the command line after ``kdlab``, a string formatted with these folders and then split
like a shell (``shlex``):

=========  ====================================================================================
``{t}``    the case's own empty folder (also the current folder while the case runs)
``{b}``    the digits base: ``teacher.yaml``, ``student.yaml``, finished runs ``teacher/`` and
           ``student/`` (cnn_tiny, 1-2 epochs), and model files made from them
           (``notdict.pt``, ``five.pt``, ``model.onnx``)
``{lm}``   the language-model base: ``lm.yaml`` (byte tokens), finished ``byte/teacher/best.pt``
           and ``bpe/teacher/best.pt`` (BPE tokens), a text corpus
``{study}``  a finished study folder (``baseline`` and ``kd``, seed 0, ``report/table.json``)
=========  ====================================================================================

Only the bases a case names are built (once per test session). ``files`` maps paths below ``{t}``
to their content (bytes, text, or ``fn(path, bases)`` that writes it) before the case runs.
``expect``: a fragment the one error line must contain (the file, flag or key it must name, or the
fix); without it the line only has to be one ``kdlab: error:`` line. ``quiet=True``: stdout must
stay empty and no new file or folder may appear either (else the outcome is ``noisy``).

A new command family adds its cases in a file ``tests/bad_cases_<family>.py`` defining ``CASES``
(a list of :class:`C`) and, when it needs finished runs of its own, ``BASES`` (name ->
``fn(folder) -> None`` that fills ``folder``; the case then writes ``{name}``). The suite
(``tests/test_bad_inputs.py``) picks such files up by themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union


@dataclass
class C:
    family: str
    name: str
    argv: Union[str, Callable[..., list]]
    expect: Optional[str] = None
    files: dict = field(default_factory=dict)
    #: ``"cli"`` (``kdlab.cli.main.main(argv)``) or ``"api"`` (``argv`` is ``fn(t, bases)`` that calls the
    #: Python API; it must raise ``ValueError``/``FileNotFoundError``/``KeyError`` with one line).
    kind: str = "cli"
    extra: Any = None
    #: also require that nothing is printed on stdout and no file or folder is created (a case of a
    #: command that prints a header or writes data before its slow part: all its checks come first)
    quiet: bool = False
