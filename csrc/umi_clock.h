/* The default clock of WorkingMemory: monotonic seconds, read without Python.
 *
 * POSIX: clock_gettime(CLOCK_MONOTONIC), the clock time.monotonic() reads, so a
 * user comparing against time.monotonic() sees the same timeline. Windows:
 * QueryPerformanceCounter. Header-only so the read inlines into the caller.
 */
#ifndef UMI_CLOCK_H
#define UMI_CLOCK_H

#ifdef _WIN32
#define WIN32_LEAN_AND_MEAN
#include <windows.h>

static inline double umi_monotonic_secs(void) {
    static double secs_per_tick = 0.0;
    LARGE_INTEGER now;
    if (secs_per_tick == 0.0) {
        LARGE_INTEGER freq;
        QueryPerformanceFrequency(&freq);
        secs_per_tick = 1.0 / (double)freq.QuadPart;
    }
    QueryPerformanceCounter(&now);
    return (double)now.QuadPart * secs_per_tick;
}
#else
#include <time.h>

static inline double umi_monotonic_secs(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
#endif

#endif
