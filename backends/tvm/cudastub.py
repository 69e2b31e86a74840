"""C source of a stand-in CUDA driver, compiled on build machines without a GPU (see build.py)."""

SOURCE = r"""
/* Stand-in for the CUDA driver (libcuda.so.1) on build machines without a GPU.
 *
 * TVM's CUDA runtime module (libtvm_runtime_cuda.so) links libcuda.so.1. Without it TVM cannot
 * register its CUDA module type, and tvm.compile silently embeds CUDA *source* in the library
 * instead of calling nvcc. With this stub loaded first, nvcc is called and the library holds a
 * real fatbin. Every entry point reports "no device": nothing here can run a kernel.
 */
#include <stddef.h>

typedef int CUresult;
#define CUDA_ERROR_NO_DEVICE 100

CUresult cuGetErrorName(CUresult e, const char **s) { (void)e; *s = "CUDA_ERROR_NO_DEVICE"; return 0; }
CUresult cuGetErrorString(CUresult e, const char **s) { (void)e; *s = "fxopt build stub: no CUDA driver"; return 0; }
CUresult cuDeviceGetName(char *n, int len, int dev) {
  (void)n; (void)len; (void)dev; return CUDA_ERROR_NO_DEVICE;
}
CUresult cuFuncSetAttribute(void *f, int a, int v) { (void)f; (void)a; (void)v; return CUDA_ERROR_NO_DEVICE; }
CUresult cuLaunchKernelEx(const void *c, void *f, void **p, void **e) {
  (void)c; (void)f; (void)p; (void)e; return CUDA_ERROR_NO_DEVICE;
}
CUresult cuModuleGetFunction(void **f, void *m, const char *n) {
  (void)f; (void)m; (void)n; return CUDA_ERROR_NO_DEVICE;
}
CUresult cuModuleLoadData(void **m, const void *img) { (void)m; (void)img; return CUDA_ERROR_NO_DEVICE; }
CUresult cuModuleUnload(void *m) { (void)m; return CUDA_ERROR_NO_DEVICE; }
CUresult cuTensorMapEncodeTiled(void *t, ...) { (void)t; return CUDA_ERROR_NO_DEVICE; }
CUresult cuInit(unsigned int flags) { (void)flags; return CUDA_ERROR_NO_DEVICE; }
CUresult cuDriverGetVersion(int *v) { if (v) *v = 0; return CUDA_ERROR_NO_DEVICE; }
"""
