"""What every binary says about itself, and shimctl's shell completion run in
real shells: bash calling the generated function as readline would, zsh
completing a typed line in an interactive shell on a pty (zsh/zpty), with a
compadd wrapper recording the candidates it offers."""
import os
import re
import shutil
import subprocess
import tempfile

import pytest

from containers import BIN, REPO

SHIMCTL = os.path.join(BIN, "shimctl")


def version():
    with open(os.path.join(REPO, "CMakeLists.txt")) as f:
        return re.search(r"project\(shimlet VERSION (\S+)", f.read()).group(1)


@pytest.mark.parametrize("name", ["shimctl", "shimlet-master", "shimlet-hook", "shimlet", "shimlet-session",
                                  "shimlet-node-metrics", "shimlet-cri"])
def test_version(name):
    p = subprocess.run([os.path.join(BIN, name), "--version"], capture_output=True, text=True, timeout=10)
    assert (p.returncode, p.stdout, p.stderr) == (0, f"{name} {version()}\n", "")


def test_help_lists_every_command():
    out = subprocess.run([SHIMCTL, "--help-all"], capture_output=True, text=True, check=True).stdout
    for word in ("exec", "port-forward", "completion", "--kubeconfig", "--stdio", "--limit-memory"):
        assert word in out, word
    out = subprocess.run([os.path.join(BIN, "shimlet-hook"), "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("shimlet-hook: the OCI runtime hook") and "poststop" in out and "--version" in out


def test_completion_unknown_shell():
    p = subprocess.run([SHIMCTL, "completion", "fish"], capture_output=True, text=True)
    assert p.returncode == 255 and "fish" in p.stderr and p.stdout == ""


@pytest.fixture(scope="module")
def scripts():
    d = tempfile.mkdtemp(prefix="shimctl-completion-")
    for shell, name in (("bash", "shimctl.bash"), ("zsh", "_shimctl")):
        with open(os.path.join(d, name), "w") as f:
            f.write(subprocess.run([SHIMCTL, "completion", shell], capture_output=True, text=True,
                                   check=True).stdout)
    os.makedirs(os.path.join(d, "files/some-dir"))
    open(os.path.join(d, "files/kube.yaml"), "w").close()
    yield d
    shutil.rmtree(d)


def bash_complete(scripts, line):
    """COMPREPLY for `line` (the cursor at its end) as bash's programmable completion computes it."""
    words = line.split(" ")
    prog = (f'source {scripts}/shimctl.bash\n'
            f'COMP_WORDS=({" ".join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n'
            f'_shimctl; printf "%s\\n" "${{COMPREPLY[@]}}"\n')
    p = subprocess.run(["bash", "--norc", "--noprofile", "-c", prog], capture_output=True, text=True, timeout=10,
                       cwd=os.path.join(scripts, "files"))
    assert p.returncode == 0 and p.stderr == "", p.stderr
    return sorted(w for w in p.stdout.splitlines() if w)


def test_bash_completion(scripts):
    c = lambda line: bash_complete(scripts, line)
    assert c("shimctl ") == ["completion", "exec", "port-forward", "sessions"]
    assert c("shimctl sessions ") == ["export", "list", "play"]  # nested commands
    assert c("shimctl e") == ["exec"]
    assert c("shimctl --kubeconfig kc.yaml -n ns e") == ["exec"]  # flag values are not commands
    assert c("shimctl exec --li") == ["--limit-cpu-weight", "--limit-memory", "--limit-pids"]
    assert "--local" in c("shimctl exec --lo")  # the top level's flags after the command
    assert c("shimctl port-forward --st") == ["--state-dir", "--stdio"]
    assert c("shimctl completion ") == ["bash", "zsh"]
    assert c("shimctl --kubeconfig k") == ["kube.yaml"]  # FILE
    assert c("shimctl --state-dir s") == ["some-dir"]  # DIR
    assert c("shimctl --server ") == []  # a value of the user's own
    assert c("shimctl exec pod -- ls --") == []  # the container's command: not ours


def zsh_complete(scripts, line):
    """The candidates zsh's completion system offers for `line` typed in an interactive zsh on a pty."""
    out = os.path.join(scripts, "zsh.out")
    if os.path.exists(out):
        os.unlink(out)
    # Each step waits on an event: the prompt (zpty -r with a pattern), then a marker file line.
    prog = f'''
zmodload zsh/zpty
zpty z zsh -f -i
zpty -w z "fpath=({scripts} \\$fpath); autoload -Uz compinit; compinit -u -D"
zpty -w z "compadd() {{ local -a h; builtin compadd -O h \\"\\$@\\"; \\
print -rl -- \\"\\${{h[@]}}\\" >> {out}; builtin compadd \\"\\$@\\" }}"
zpty -w z "PROMPT='RE''ADY> '"
zpty -r z junk '*READY> '
zpty -w -n z {line!r}$'\\t'
zpty -w -n z $'\\C-u'
zpty -w z "print -r -- __DONE__ >> {out}"
while ! grep -qs __DONE__ {out}; do sleep 0.02; done
zpty -d z
'''
    p = subprocess.run(["zsh", "-f", "-c", prog], capture_output=True, text=True, timeout=30,
                       cwd=os.path.join(scripts, "files"))
    assert p.returncode == 0, p.stderr
    with open(out) as f:
        return sorted({w for w in f.read().splitlines() if w and w != "__DONE__"})


def test_zsh_completion(scripts):
    if not shutil.which("zsh"):
        raise AssertionError("zsh missing: install it (scripts/deps)")
    c = lambda line: zsh_complete(scripts, line)
    assert c("shimctl ex") == ["exec"]
    assert c("shimctl exec --kub") == ["--kubeconfig"]
    assert c("shimctl exec --li") == ["--limit-cpu-weight", "--limit-memory", "--limit-pids"]
    assert c("shimctl port-forward --add") == ["--address"]
    assert c("shimctl completion ") == ["bash", "zsh"]
    assert c("shimctl --kubeconfig ku") == ["kube.yaml"]
    assert c("shimctl --state-dir so") == ["some-dir"]
