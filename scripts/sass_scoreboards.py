"""Which instructions of the masked step's tile loop wait on the scoreboard of the next tile's loads (sm_80+ SASS).

    python scripts/sass_scoreboards.py OBJECT [--kernel REGEX] [--listing]

OBJECT: an object or binary with sm_90 (or sm_80) code, e.g. nvcc -c of csrc/cuda/masked_grad_y.cu. Needs cuobjdump
and nvdisasm (CUDA toolkit, or PyPI's nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm wheels: requirements-ci.txt).

Why (benchmarks/NOTES.md #97): since Volta each SASS instruction carries control bits the compiler sets, among them a
write scoreboard (one of six; a variable-latency instruction, such as a global or shared load, counts it up until
its result lands) and a mask of the scoreboards the instruction waits on (until their counts are zero). ptxas put
every global load into registers of masked_grad_y_kernel's tile loop on one scoreboard, so an instruction that
waited for one of them (the partial fragment loaded before the tile's first barrier) waited for all those issued
since, the next tile's dY vectors among them: the products, issued after those loads, started only once they had
landed, and the prefetch a tile ahead hid nothing. cuobjdump prints each instruction's 128 bits as two 64-bit words;
the control bits are the top of the second (bit k of the instruction is bit k - 64 of that word):
    105-108 stall cycles, 109 yield, 110-112 write scoreboard (7: none), 113-115 read scoreboard (7: none),
    116-121 wait mask, 122-125 operand reuse
(the layout of Jia et al., "Dissecting the NVIDIA Volta GPU Architecture via Microbenchmarking", 2018, and its
Turing sequel; it reads consistently on sm_90 SASS from nvcc 13.0: each load's consumer waits on the load's bit).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig

# The loop's loads for the next tile: dY's vectors (__ldcs, evict-first, 16 bytes) and xa's rows (__ldg, 16 bytes).
NEXT_TILE_LOADS = ("LDG.E.EF.128", "LDG.E.128.CONSTANT")
_ROW = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*/\* (0x[0-9a-f]{16}) \*/")
_HIGH = re.compile(r"^\s*/\* (0x[0-9a-f]{16}) \*/\s*$")


@dataclasses.dataclass
class Instruction:
    address: int
    text: str
    write_scoreboard: int | None  # None: sets none
    wait_mask: int  # bit i: waits until scoreboard i is clear

    def waits_on(self, scoreboard: int) -> bool:
        return bool(self.wait_mask >> scoreboard & 1)


def decode(high_word: int) -> tuple[int | None, int]:
    """(write scoreboard or None, wait mask) from the second 64-bit word of an instruction."""
    write = (high_word >> 46) & 7
    return (None if write == 7 else write), (high_word >> 52) & 0x3F


def find_tool(name: str) -> str | None:
    """The CUDA binary `name` on PATH, else from the PyPI wheels (<site-packages>/nvidia/cu13/bin, wherever pip put the
    `nvidia` namespace package: the interpreter's, a venv's or the user's site-packages)."""
    found = shutil.which(name)
    if found:
        return found
    roots = [os.path.join(root, "nvidia") for root in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])]
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        roots += list(spec.submodule_search_locations)
    for root in roots:
        candidate = os.path.join(root, "cu13", "bin", name)
        if os.path.exists(candidate):
            return candidate
    return None


def disassemble(path: str) -> str:
    """cuobjdump -sass of `path` (cuobjdump calls nvdisasm: both must be found)."""
    cuobjdump, nvdisasm = find_tool("cuobjdump"), find_tool("nvdisasm")
    if cuobjdump is None or nvdisasm is None:
        raise FileNotFoundError("needs cuobjdump and nvdisasm (CUDA toolkit, or pip install nvidia-cuda-cuobjdump "
                                "nvidia-cuda-nvdisasm)")
    env = dict(os.environ, PATH=os.path.dirname(nvdisasm) + os.pathsep + os.environ.get("PATH", ""))
    for tool in (cuobjdump, nvdisasm):  # a wheel's files may come without the executable bit
        if not os.access(tool, os.X_OK):
            try:
                os.chmod(tool, 0o755)
            except OSError as error:
                raise PermissionError(f"{tool} is not executable and could not be made so: {error}") from error
    return subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True, env=env).stdout


def functions(sass: str) -> dict[str, list[Instruction]]:
    """Each function's instructions, by mangled name."""
    out: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    lines = sass.splitlines()
    for i, line in enumerate(lines):
        if "Function :" in line:
            current = out.setdefault(line.split("Function :", 1)[1].strip(), [])
            continue
        match = _ROW.search(line)
        if current is None or match is None or i + 1 >= len(lines):
            continue
        high = _HIGH.match(lines[i + 1])
        if high is None:
            continue
        write, wait = decode(int(high.group(1), 16))
        current.append(Instruction(int(match.group(1), 16), match.group(2).strip(), write, wait))
    return out


def product_stretches(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The stretches between barriers that hold tensor-core products (HMMA): in the masked step's loop, the tile's
    products, after its first barrier. (The stretch that ends at the first barrier, the mask phase, has none: it waits
    on its own tile's loads on purpose.)"""
    stretches: list[list[Instruction]] = [[]]
    for ins in instructions:
        if "BAR.SYNC" in ins.text:
            stretches.append([])
        else:
            stretches[-1].append(ins)
    return [stretch for stretch in stretches if any("HMMA" in ins.text for ins in stretch)]


def is_next_tile_load(ins: Instruction) -> bool:
    return any(kind in ins.text for kind in NEXT_TILE_LOADS) and ins.write_scoreboard is not None


def products_waiting_on_next_tile(instructions: list[Instruction]) -> list[Instruction]:
    """In each product stretch, the instructions that wait on a scoreboard counted by the next tile's loads issued
    earlier in that stretch (in address order, the order the loop runs them): each waits for those loads to land.
    Empty where none does."""
    offending = []
    for stretch in product_stretches(instructions):
        counted: set[int] = set()  # the scoreboards of the next tile's loads issued so far in the stretch
        for ins in stretch:
            if any(ins.waits_on(board) for board in counted):
                offending.append(ins)
            if is_next_tile_load(ins):
                counted.add(ins.write_scoreboard)
    return offending


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("object")
    parser.add_argument("--kernel", default=r"masked_grad_y_kernel.*Li0E", help="regex on the mangled names "
                        "(default: the register scheme's variants)")
    parser.add_argument("--listing", action="store_true", help="print every instruction with its control bits")
    args = parser.parse_args()
    found = 0
    for name, instructions in functions(disassemble(args.object)).items():
        if not re.search(args.kernel, name):
            continue
        bad = products_waiting_on_next_tile(instructions)
        found += len(bad)
        print(f"{name}: {len(instructions)} instructions, {len(bad)} waiting on the next tile's loads")
        for ins in bad:
            print(f"  {ins.address:05x} wait mask {ins.wait_mask:06b}  {ins.text}")
        if args.listing:
            for ins in instructions:
                write = "-" if ins.write_scoreboard is None else ins.write_scoreboard
                print(f"    {ins.address:05x} W{write} wait {ins.wait_mask:06b}  {ins.text}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
