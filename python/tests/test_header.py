"""The ferry package's mirrors of the C ABI against ffi/include/ferry.h, as a C compiler sees the header.

A C program generated from the header prints the size, alignment and every field's offset and
size of each struct, and the value of each constant (#define and enum); the test compares them
with the ctypes structures (every field, in order, both ways) and the numpy dtypes, with the package's constants (every
one, both ways), and compares the signatures the package binds with the header's prototypes. Needs
`cc`, not libferry.so.
"""

import ctypes
import pathlib
import re
import shutil
import subprocess
import tempfile
import unittest

import numpy as np

import ferry

INCLUDE = pathlib.Path(__file__).resolve().parents[2] / "ffi" / "include"
HEADER = (INCLUDE / "ferry.h").read_text()
# The header's text without comments, which would otherwise match the patterns below.
CODE = re.sub(r"//[^\n]*|/\*.*?\*/", "", HEADER, flags=re.S)

# C scalar types of the header and their ctypes counterparts.
SCALARS = {
    "uint8_t": ctypes.c_uint8,
    "uint32_t": ctypes.c_uint32,
    "int32_t": ctypes.c_int32,
    "uint64_t": ctypes.c_uint64,
    "size_t": ctypes.c_size_t,
    "int": ctypes.c_int,
    "ferry_result": ctypes.c_int,
}


def header_structs():
    """{struct name: [(C type, field name, array length or None)]} of the structs with a body."""
    structs = {}
    for body, name in re.findall(r"typedef struct \{(.*?)\} (\w+);", CODE, flags=re.S):
        fields = []
        for line in filter(None, (line.strip() for line in body.splitlines())):
            m = re.fullmatch(r"(?P<type>.*[\s*])(?P<name>\w+)(?:\[(?P<len>\d+)\])?;", line)
            assert m, f"{name}: cannot read the field line {line!r}"
            fields.append((m["type"].strip(), m["name"], int(m["len"]) if m["len"] else None))
        structs[name] = fields
    return structs


def header_constants():
    """The names of every #define with a value and every enum variant."""
    defines = re.findall(r"^#define (\w+) \S", CODE, flags=re.M)
    variants = re.findall(r"^\s+(\w+) = [^,\n]+,$", CODE, flags=re.M)
    return defines + variants


def header_prototypes():
    """{function: (return type, [parameter types])} of the header's function declarations."""
    block = re.sub(r"^#.*$", "", CODE[CODE.index('extern "C" {') :], flags=re.M)
    prototypes = {}
    for ret, name, params in re.findall(r"([\w\s*]+?)\b(ferry_\w+)\(([^)]*)\);", block):
        types = [re.sub(r"\w+$", "", p.strip()).strip() for p in params.split(",") if p.strip() != "void"]
        prototypes[name] = (" ".join(ret.split()), [" ".join(t.split()) for t in types])
    return prototypes


def python_structs():
    """{C struct name: ctypes class} of every ctypes.Structure defined in the package."""
    mirrors = {}
    for value in vars(ferry).values():
        if isinstance(value, type) and issubclass(value, ctypes.Structure) and value.__module__ == "ferry":
            c_name = getattr(value, "_c_name", None)
            assert c_name, f"ferry.{value.__name__} does not name the C struct it mirrors (_c_name)"
            mirrors[c_name] = value
    return mirrors


def python_constants():
    """{header name: value}: FERRY_<NAME> for each int NAME of the package, FERRY_<NAME>_<KEY> for
    each key of each str-to-int dict NAME (STATUS, RESULT, ...)."""
    constants = {}
    for name, value in vars(ferry).items():
        if not name.isupper() or name.startswith("_"):
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            constants[f"FERRY_{name}"] = value
        elif isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            for key, code in value.items():
                constants[f"FERRY_{name}_{key.upper()}"] = code
    return constants


def ctypes_of(c_type, structs):
    """The ctypes type a C type maps to in an argument, result or field."""
    bare = c_type.removeprefix("const ").strip()
    if bare == "void":
        return None
    if bare == "char *":
        return ctypes.c_char_p
    if bare.endswith("**"):
        return ctypes.POINTER(ctypes.c_void_p)
    if bare.endswith("*"):
        target = bare[:-1].strip()
        if target in structs:
            return ctypes.POINTER(structs[target])
        if target in SCALARS and target != "uint8_t":
            return ctypes.POINTER(SCALARS[target])
        return ctypes.c_void_p  # opaque handles and byte addresses
    return SCALARS[bare]


class HeaderTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if shutil.which("cc") is None:
            print("SKIP: no C compiler (cc on PATH): the package was not checked against ferry.h")
            raise unittest.SkipTest("no C compiler")
        cls.structs = header_structs()
        cls.constants = header_constants()
        lines = []
        for name, fields in cls.structs.items():
            lines.append(f'printf("struct {name} %zu %zu\\n", sizeof({name}), _Alignof({name}));')
            for _, field, _ in fields:
                lines.append(
                    f'printf("field {name} {field} %zu %zu\\n", offsetof({name}, {field}), '
                    f"sizeof((({name} *)0)->{field}));"
                )
        for name in cls.constants:
            lines.append(f'printf("const {name} %lld\\n", (long long)({name}));')
        lines.append('printf("sizeof ferry_result %zu\\n", sizeof(ferry_result));')
        program = (
            "#include <stddef.h>\n#include <stdio.h>\n#include \"ferry.h\"\n\nint main(void) {\n    "
            + "\n    ".join(lines)
            + "\n    return 0;\n}\n"
        )
        with tempfile.TemporaryDirectory() as tmp:
            source, exe = pathlib.Path(tmp) / "layout.c", pathlib.Path(tmp) / "layout"
            source.write_text(program)
            compiled = subprocess.run(
                ["cc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-I", str(INCLUDE), str(source), "-o", str(exe)],
                capture_output=True,
                text=True,
            )
            if compiled.returncode != 0:
                raise AssertionError(f"compiling the layout program failed:\n{compiled.stderr}\n{program}")
            out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
        # "struct S size align", "field S f offset size", "const NAME value", "sizeof T size".
        cls.c = {}
        for line in out.splitlines():
            parts = line.split()
            n = 3 if parts[0] == "field" else 2
            values = tuple(int(v) for v in parts[n:])
            cls.c[tuple(parts[:n])] = values[0] if parts[0] == "const" else values

    def test_the_header_was_read(self):
        self.assertGreaterEqual(set(self.structs), {"ferry_config", "ferry_descriptor", "ferry_completion"})
        self.assertIn("FERRY_RESULT_PANIC", self.constants)
        self.assertIn("FERRY_STATUS_OK", self.constants)

    def test_every_struct_is_mirrored_field_by_field(self):
        mirrors = python_structs()
        self.assertEqual(set(mirrors), set(self.structs), "C structs with a body vs the package's ctypes mirrors")
        for name, fields in self.structs.items():
            mirror = mirrors[name]
            with self.subTest(struct=name):
                self.assertEqual(
                    [f[0] for f in mirror._fields_],
                    [field for _, field, _ in fields],
                    f"{name}: ferry.{mirror.__name__}'s fields vs the header's, in order",
                )
                size, align = self.c[("struct", name)]
                self.assertEqual((ctypes.sizeof(mirror), ctypes.alignment(mirror)), (size, align), f"{name}: size, alignment")
                for (c_type, field, length), (py_field, py_type) in zip(fields, mirror._fields_):
                    offset, field_size = self.c[("field", name, field)]
                    self.assertEqual(getattr(mirror, py_field).offset, offset, f"{name}.{field}: offset")
                    self.assertEqual(ctypes.sizeof(py_type), field_size, f"{name}.{field}: size")
                    want = ctypes_of(c_type, mirrors)
                    if length is not None:
                        self.assertTrue(hasattr(py_type, "_length_"), f"{name}.{field}: an array in C")
                        self.assertEqual((py_type._type_, py_type._length_), (want, length), f"{name}.{field}")
                    else:
                        self.assertIs(py_type, want, f"{name}.{field}: {c_type} in C")

    def test_every_constant_has_the_value_of_the_header(self):
        mirrored = python_constants()
        self.assertEqual(
            sorted(set(self.constants) - set(mirrored)), [], "constants of ferry.h that the package lacks"
        )
        self.assertEqual(
            sorted(set(mirrored) - set(self.constants)), [], "constants of the package that ferry.h lacks"
        )
        for name in self.constants:
            self.assertEqual(mirrored[name], self.c[("const", name)], name)

    def test_the_numpy_dtypes_are_the_c_structs(self):
        for dtype, name in ((ferry.DESCRIPTOR_DTYPE, "ferry_descriptor"), (ferry.COMPLETION_DTYPE, "ferry_completion")):
            with self.subTest(struct=name):
                self.assertEqual(list(dtype.names), [field for _, field, _ in self.structs[name]])
                self.assertEqual(dtype.itemsize, self.c[("struct", name)][0])
                for c_type, field, _ in self.structs[name]:
                    format, offset = dtype.fields[field][:2]
                    self.assertEqual((offset, format.itemsize), self.c[("field", name, field)], f"{name}.{field}")
                    self.assertEqual(format, np.dtype(SCALARS[c_type]), f"{name}.{field}: {c_type}")

    def test_address_bindings_are_the_typed_ones_with_void_pointers(self):
        typed = {name: (args, res) for name, args, res in ferry._SIGNATURES}
        for name, args, res in ferry._ADDRESS_SIGNATURES:
            with self.subTest(function=name):
                want_args, want_res = typed[name]
                self.assertIs(res, want_res)
                self.assertEqual(len(args), len(want_args))
                for got, want in zip(args, want_args):
                    is_struct_pointer = getattr(want, "_type_", None) in (ferry.Descriptor, ferry.Completion)
                    self.assertEqual(got, ctypes.c_void_p if is_struct_pointer else want, name)

    def test_every_bound_function_has_the_header_signature(self):
        prototypes, mirrors = header_prototypes(), python_structs()
        self.assertGreaterEqual(len(prototypes), 20, prototypes)
        self.assertEqual(self.c[("sizeof", "ferry_result")], (ctypes.sizeof(ctypes.c_int),))
        for name, args, res in ferry._SIGNATURES:
            with self.subTest(function=name):
                self.assertIn(name, prototypes, "the package binds a function the header lacks")
                ret, params = prototypes[name]
                self.assertIs(res, ctypes_of(ret, mirrors), f"{name}: returns {ret}")
                self.assertEqual(args, [ctypes_of(p, mirrors) for p in params], f"{name}: takes {params}")


if __name__ == "__main__":
    unittest.main()
