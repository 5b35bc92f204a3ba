/* Opens and frees 100 000 queues, one copy on each (every other queue freed with its copy
 * still in flight), and checks that the process's file descriptors do not pile up: freeing a
 * queue hands it back to the engine, whose worker then releases its memfd. */
#define _POSIX_C_SOURCE 200809L

#include "check.h"

#include <dirent.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

enum { CYCLES = 100000, BLOCK = 64, BLOCKS = 64 };
/* Queues the worker may not have freed yet while the loop runs ahead of it. */
enum { LAG = 256 };

/* Entries of /proc/self/fd, without "." and ".." (the directory's own descriptor counts too,
 * the same every time). -1 when it cannot be read. */
static int open_fds(void) {
    DIR *dir = opendir("/proc/self/fd");
    if (dir == NULL) return -1;
    int n = 0;
    for (struct dirent *e = readdir(dir); e != NULL; e = readdir(dir)) {
        if (e->d_name[0] != '.') n++;
    }
    closedir(dir);
    return n;
}

int main(void) {
    ferry_config config;
    memset(&config, 0, sizeof config);
    config.unpinned = 1;
    config.yield_when_idle = 1; /* this program waits by yielding too: neither starves the other */
    ferry_engine *engine = NULL;
    CHECK(ferry_engine_start(&config, &engine) == FERRY_RESULT_OK);
    uint32_t client = 0;
    CHECK(ferry_engine_new_client(engine, &client) == FERRY_RESULT_OK);
    ferry_host_buffer *src = NULL, *dst = NULL;
    CHECK(ferry_host_alloc(engine, client, BLOCK * BLOCKS, &src) == FERRY_RESULT_OK);
    CHECK(ferry_host_alloc(engine, client, BLOCK * BLOCKS, &dst) == FERRY_RESULT_OK);
    uint8_t *s = ferry_host_buffer_data(src), *d = ferry_host_buffer_data(dst);
    for (int i = 0; i < BLOCK * BLOCKS; i++) s[i] = (uint8_t)(i / BLOCK + 1);

    const int before = open_fds();
    CHECK(before > 0);
    int most = before;
    ferry_descriptor desc;
    memset(&desc, 0, sizeof desc);
    desc.src_region = ferry_host_buffer_region(src);
    desc.dst_region = ferry_host_buffer_region(dst);
    desc.len = BLOCK;
    for (long i = 0; i < CYCLES; i++) {
        ferry_queue *queue = NULL;
        CHECK(ferry_queue_open(engine, client, 8, 8, &queue) == FERRY_RESULT_OK);
        desc.tag = (uint64_t)i;
        desc.src_offset = desc.dst_offset = (uint64_t)(i % BLOCKS) * BLOCK;
        size_t pushed = 0;
        CHECK(ferry_queue_submit(queue, &desc, 1, &pushed) == FERRY_RESULT_OK && pushed == 1);
        if (i % 2 == 0) {
            ferry_completion done;
            size_t n = 0;
            for (time_t start = time(NULL); n == 0 && time(NULL) - start < 20; sched_yield()) {
                CHECK(ferry_queue_poll(queue, &done, 1, &n) == FERRY_RESULT_OK);
            }
            CHECK(n == 1 && done.tag == (uint64_t)i && done.status == FERRY_STATUS_OK);
        }
        ferry_queue_free(queue);
        if (i % 1000 == 999) {
            int now = open_fds();
            if (now > most) most = now;
            CHECK(now >= 0 && now < before + LAG);
        }
    }
    /* The worker frees the last queues soon after they were freed here: wait for it. */
    int after = open_fds();
    for (time_t start = time(NULL); after != before && time(NULL) - start < 20; after = open_fds()) {
        sched_yield();
    }
    printf("c churn: %d queues; open descriptors %d before, at most %d during, %d after\n", CYCLES, before,
           most, after);
    CHECK(after == before);
    /* The copies waited for landed (even cycles fill the even blocks); the regions are not
     * held by the copies of the queues freed with one in flight. */
    for (int b = 0; b < BLOCKS; b += 2) CHECK(d[b * BLOCK] == (uint8_t)(b + 1));

    CHECK(ferry_deregister(engine, ferry_host_buffer_region(src)) == FERRY_RESULT_OK);
    CHECK(ferry_deregister(engine, ferry_host_buffer_region(dst)) == FERRY_RESULT_OK);
    ferry_host_buffer_free(src);
    ferry_host_buffer_free(dst);
    ferry_engine_free(engine);
    printf("c churn: ok\n");
    return 0;
}
