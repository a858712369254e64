"""`medmo run` is the product: the test kubelet and the kubernetes client stay out of it."""

import subprocess
import sys


def test_medmo_run_imports_neither_the_test_kubelet_nor_the_kubernetes_client():
    code = ("import sys, medmo_operator.cli, medmo_operator.local.run; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kubernetes', 'controlplane')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
