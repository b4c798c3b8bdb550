/*
 * Issue 3's question: would liblvm2cmd (lvm2_run in-process) or libdevmapper (snapshot status
 * without a fork) make the LVM backend faster than the command-line tools it runs now?
 * Measures, in the same process and guest, alternating, N times each:
 *   report: `lvs --reportformat json -o ... VG` as a child process   vs  lvm2_run(handle, same)
 *   fill:   `lvs -o data_percent VG/SNAP` as a child process          vs  DM_DEVICE_STATUS ioctl
 * Prints one line per pair: name, median child-process ms, median in-process ms.
 * Built by scripts/lvm-guest --bench (clang, -llvm2cmd -ldevmapper), run inside the guest.
 *   usage: lvm-api-bench VG SNAPSHOT_LV N
 */
#include <libdevmapper.h>
#include <lvm2cmd.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

extern char **environ;

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
    qsort(v, n, sizeof *v, cmp);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* Runs argv as a child with stdout/stderr to /dev/null; returns its exit status. */
static int child(char *const argv[]) {
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", 1, 0);
    posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", 1, 0);
    pid_t pid;
    int status = -1;
    if (posix_spawnp(&pid, argv[0], &fa, NULL, argv, environ) == 0) waitpid(pid, &status, 0);
    posix_spawn_file_actions_destroy(&fa);
    return status;
}

static void quiet(int level, const char *file, int line, int dm_errno, const char *message) {
    (void)level; (void)file; (void)line; (void)dm_errno; (void)message;
}

static void quiet_dm(int level, const char *file, int line, int dm_errno, const char *format, ...) {
    (void)level; (void)file; (void)line; (void)dm_errno; (void)format;
}

/* Snapshot fill through the device-mapper status ioctl: "used/total metadata" sectors. */
static int dm_fill(const char *dm_name, double *percent) {
    struct dm_task *t = dm_task_create(DM_DEVICE_STATUS);
    if (!t) return -1;
    int ok = dm_task_set_name(t, dm_name) && dm_task_run(t);
    uint64_t start, length;
    char *type = NULL, *params = NULL;
    if (ok) dm_get_next_target(t, NULL, &start, &length, &type, &params);
    unsigned long long used = 0, total = 1;
    ok = ok && type && strcmp(type, "snapshot") == 0 && params && sscanf(params, "%llu/%llu", &used, &total) == 2;
    if (ok) *percent = 100.0 * used / total;
    dm_task_destroy(t);
    return ok ? 0 : -1;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s VG SNAPSHOT_LV N\n", argv[0]);
        return 2;
    }
    const char *vg = argv[1], *snap = argv[2];
    int n = atoi(argv[3]);
    if (n < 1 || n > 1000) return 2;
    double *a = calloc(n, sizeof *a), *b = calloc(n, sizeof *b);
    char fields[] = "lv_name,lv_attr,origin,lv_size,data_percent,lv_tags,lv_device_open";
    char command[512], full[600], dm_name[300];
    snprintf(command, sizeof command, "lvs --reportformat json --units b -o %s %s", fields, vg);
    snprintf(full, sizeof full, "%s/%s", vg, snap);
    /* device-mapper names double the hyphens inside VG and LV names */
    char *o = dm_name;
    for (const char *p = vg; *p; p++) { *o++ = *p; if (*p == '-') *o++ = '-'; }
    *o++ = '-';
    for (const char *p = snap; *p; p++) { *o++ = *p; if (*p == '-') *o++ = '-'; }
    *o = 0;

    lvm2_log_fn(quiet);
    void *handle = lvm2_init();
    if (!handle) { fprintf(stderr, "lvm2_init failed\n"); return 1; }
    lvm2_log_level(handle, 0);

    char *report_argv[] = {"lvs", "--reportformat", "json", "--units", "b", "-o", fields, (char *)vg, NULL};
    for (int i = 0; i < n; i++) {
        double s = now_ms();
        if (child(report_argv) != 0) { fprintf(stderr, "lvs failed\n"); return 1; }
        a[i] = now_ms() - s;
        s = now_ms();
        if (lvm2_run(handle, command) != LVM2_COMMAND_SUCCEEDED) { fprintf(stderr, "lvm2_run failed\n"); return 1; }
        b[i] = now_ms() - s;
    }
    printf("report %.1f %.1f\n", median(a, n), median(b, n));

    char *fill_argv[] = {"lvs", "--noheadings", "-o", "data_percent", full, NULL};
    dm_log_with_errno_init(quiet_dm);
    for (int i = 0; i < n; i++) {
        double s = now_ms(), pct = 0;
        if (child(fill_argv) != 0) { fprintf(stderr, "lvs data_percent failed\n"); return 1; }
        a[i] = now_ms() - s;
        s = now_ms();
        if (dm_fill(dm_name, &pct) != 0) { fprintf(stderr, "device-mapper status of %s failed\n", dm_name); return 1; }
        b[i] = now_ms() - s;
    }
    printf("fill %.3f %.3f\n", median(a, n), median(b, n));
    lvm2_exit(handle);
    return 0;
}
