// Error reporting for the C ABI: a launcher records a message and returns a nonzero FsStatus;
// Python reads it back with fs_last_error(). One definition per library (status.cpp).
#pragma once
#include "fastscan_abi.h"

// printf-style; returns `code` so a launcher can write `return fs_fail(FS_ERR_INVALID, "...", ...)`.
int fs_fail(int code, const char* fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
