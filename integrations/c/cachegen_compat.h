/*
 * Include this instead of <cachegen.h> to use the C ABI with a header that
 * has the cg_job_info name clash (below). It provides
 *
 *   cg_job_info_t              the job snapshot struct
 *   cg_job_info(job, &info)    the function filling it, called as usual
 *
 * The clash: include/cachegen.h of libcachegen 0.1.0 (cbindgen style "both")
 * declares
 *     typedef struct cg_job_info { ... } cg_job_info;
 *     int32_t cg_job_info(const struct cg_job *job, struct cg_job_info *info);
 * A typedef and a function may not share a name, in C ("redeclared as
 * different kind of symbol") as in C++, so that header does not compile.
 *
 * With CACHEGEN_JOB_INFO_CLASH defined (scripts/c_tests.sh defines it after
 * checking that the plain header fails to compile), a function-like macro
 * renames only the header's function declaration (a function-like macro
 * expands only where the name is followed by "("; the typedef and struct tag
 * are left alone), and the real symbol is declared under another name with
 * an asm label (GCC, Clang). cg_job_info(job, &info) calls it. Without the
 * macro the header is included unchanged.
 */
#ifndef CACHEGEN_COMPAT_H
#define CACHEGEN_COMPAT_H

#ifdef CACHEGEN_JOB_INFO_CLASH
#define cg_job_info(...) cg_job_info_unused_decl_(__VA_ARGS__)
#include <cachegen.h>
#undef cg_job_info
typedef struct cg_job_info cg_job_info_t;
#ifdef __cplusplus
extern "C" {
#endif
/* The exported function cg_job_info, under a name that does not clash. */
int32_t cg_job_info_get_(const struct cg_job *job, struct cg_job_info *info) __asm__("cg_job_info");
#ifdef __cplusplus
}
#endif
#define cg_job_info(job, info) cg_job_info_get_((job), (info))
#else
#include <cachegen.h>
typedef struct cg_job_info cg_job_info_t;
#endif

#endif /* CACHEGEN_COMPAT_H */
