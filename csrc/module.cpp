// The Python module drople_fast._C. It has no functions: importing it loads
// this shared library, whose static initialisers register the
// torch.ops.drople_fast.* operators (TORCH_LIBRARY_FRAGMENT in iwtd_cpu.cpp). No pybind11 needed.
#include <Python.h>

static struct PyModuleDef drople_fast_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "C++ CPU operators of drople_fast (registered as torch.ops.drople_fast.*).",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&drople_fast_c_module); }
