/* One abi3 build for CPython 3.10-3.13.
 *
 * tch's Python glue (torch-sys' torch_python.cpp, through the pybind11 headers that torch ships)
 * calls _PyThreadState_UncheckedGet when compiled with the headers of Python 3.12 or older.
 * Python 3.13 removed that name and exports the same function as PyThreadState_GetUnchecked
 * ("In Python 3.5 to 3.12, the function was private and known as _PyThreadState_UncheckedGet()",
 * CPython's C API docs), so the extension failed to import there with an undefined symbol.
 *
 * This definition is hidden inside the extension (never exported), so the glue's call binds to it
 * at link time, and it forwards to whichever of the two names the running interpreter exports. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef void *(*thread_state_getter)(void);

__attribute__((visibility("hidden"))) void *_PyThreadState_UncheckedGet(void) {
    static thread_state_getter getter = NULL;
    thread_state_getter found = __atomic_load_n(&getter, __ATOMIC_ACQUIRE);
    if (found == NULL) {
        found = (thread_state_getter)dlsym(RTLD_DEFAULT, "PyThreadState_GetUnchecked"); /* 3.13 and later */
        if (found == NULL) {
            found = (thread_state_getter)dlsym(RTLD_DEFAULT, "_PyThreadState_UncheckedGet"); /* 3.5 to 3.12 */
        }
        if (found == NULL || found == (thread_state_getter)_PyThreadState_UncheckedGet) {
            fputs("wandapp: the interpreter exports neither PyThreadState_GetUnchecked nor _PyThreadState_UncheckedGet\n", stderr);
            abort();
        }
        __atomic_store_n(&getter, found, __ATOMIC_RELEASE);
    }
    return found();
}
