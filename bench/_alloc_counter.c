/* Counts calls to Python's allocators (the "mem" and "object" domains) and the bytes asked for.

   A hook in front of the allocators in place, as tracemalloc installs one, that only adds to
   two counters: unlike a tracer, it changes nothing in how the measured code runs (a profile
   hook would make CPython create frame objects and run every instruction unspecialised).
   Loaded with ctypes.PyDLL by bench/allocations.py, which compiles it; every call holds the GIL,
   as these two domains require, so plain counters suffice. */
#include <Python.h>

unsigned long long alloc_calls = 0;
unsigned long long alloc_bytes = 0;

static PyMemAllocatorEx previous[2];
static PyMemAllocatorEx hooks[2];
static const PyMemAllocatorDomain domains[2] = {PYMEM_DOMAIN_MEM, PYMEM_DOMAIN_OBJ};
static int installed = 0;

static void *hook_malloc(void *ctx, size_t size) {
    PyMemAllocatorEx *inner = ctx;
    alloc_calls++;
    alloc_bytes += size;
    return inner->malloc(inner->ctx, size);
}

static void *hook_calloc(void *ctx, size_t count, size_t size) {
    PyMemAllocatorEx *inner = ctx;
    alloc_calls++;
    alloc_bytes += count * size;
    return inner->calloc(inner->ctx, count, size);
}

static void *hook_realloc(void *ctx, void *ptr, size_t size) {
    PyMemAllocatorEx *inner = ctx;
    alloc_calls++;
    alloc_bytes += size;
    return inner->realloc(inner->ctx, ptr, size);
}

static void hook_free(void *ctx, void *ptr) {
    PyMemAllocatorEx *inner = ctx;
    inner->free(inner->ctx, ptr);
}

void install(void) {
    if (installed) return;
    for (int i = 0; i < 2; i++) {
        PyMem_GetAllocator(domains[i], &previous[i]);
        hooks[i].ctx = &previous[i];
        hooks[i].malloc = hook_malloc;
        hooks[i].calloc = hook_calloc;
        hooks[i].realloc = hook_realloc;
        hooks[i].free = hook_free;
        PyMem_SetAllocator(domains[i], &hooks[i]);
    }
    installed = 1;
}

void uninstall(void) {
    if (!installed) return;
    for (int i = 0; i < 2; i++) PyMem_SetAllocator(domains[i], &previous[i]);
    installed = 0;
}
