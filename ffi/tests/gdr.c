/* A C client of libferry on the GPU transport over GDR: with FERRY_NIC naming an RDMA device
 * (the Soft-RoCE guest sets it), scattered 4 KiB copies between two host regions through the
 * engine, checked byte for byte, plus the transport text and the NIC counters. Without
 * FERRY_NIC it checks that use_gdr = on names the missing NIC, and prints SKIP for the rest. */
#include "check.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static ferry_config gdr_config(const char *nic) {
    ferry_config config;
    memset(&config, 0, sizeof config);
    config.unpinned = 1;
    config.yield_when_idle = 1;
    config.transport = 2; /* GPU */
    config.use_gdr = 2;   /* on */
    config.nic = nic;
    return config;
}

int main(void) {
    /* A NIC that does not exist: a start-up error whose text says what is missing. */
    ferry_config missing = gdr_config("ferry-no-such-nic");
    ferry_engine *engine = NULL;
    CHECK(ferry_engine_start(&missing, &engine) == FERRY_RESULT_SYSTEM_ERROR && engine == NULL);
    char text[512];
    ferry_last_error(text, sizeof text);
    CHECK(strstr(text, "GDR") != NULL);
    const char *nic = getenv("FERRY_NIC");
    if (nic == NULL) {
        printf("SKIP: no RDMA device named by FERRY_NIC (the Soft-RoCE guest sets it); use_gdr = on said: %s\n", text);
        printf("c gdr: ok\n");
        return 0;
    }
    CHECK(strstr(text, "ferry-no-such-nic") != NULL);

    ferry_config config = gdr_config(nic);
    CHECK(ferry_engine_start(&config, &engine) == FERRY_RESULT_OK);
    char transport[512];
    ferry_engine_transport(engine, transport, sizeof transport);
    printf("transport: %s\n", transport);
    CHECK(strncmp(transport, "gdr on ", 7) == 0 && strstr(transport, nic) != NULL);

    uint32_t client = 0;
    CHECK(ferry_engine_new_client(engine, &client) == FERRY_RESULT_OK);
    enum { SIZE = 4 << 20, BLOCK = 4096, COUNT = SIZE / BLOCK };
    ferry_host_buffer *src = NULL, *dst = NULL;
    CHECK(ferry_host_alloc(engine, client, SIZE, &src) == FERRY_RESULT_OK);
    CHECK(ferry_host_alloc(engine, client, SIZE, &dst) == FERRY_RESULT_OK);
    uint8_t *s = ferry_host_buffer_data(src), *d = ferry_host_buffer_data(dst);
    for (size_t i = 0; i < SIZE; i++) s[i] = (uint8_t)(i * 2654435761u >> 13);
    memset(d, 0xa5, SIZE);
    ferry_queue *queue = NULL;
    CHECK(ferry_queue_open(engine, client, 0, 0, &queue) == FERRY_RESULT_OK);
    /* Block i goes from source slot (i * 389) % COUNT to destination slot i: scattered reads,
     * adjacent writes. */
    size_t sent = 0, done = 0;
    while (done < COUNT) {
        if (sent < COUNT) {
            ferry_descriptor batch[64];
            size_t n = 0;
            for (; n < 64 && sent + n < COUNT; n++) {
                size_t i = sent + n;
                memset(&batch[n], 0, sizeof batch[n]);
                batch[n].tag = i;
                batch[n].src_region = ferry_host_buffer_region(src);
                batch[n].dst_region = ferry_host_buffer_region(dst);
                batch[n].src_offset = (uint64_t)((i * 389) % COUNT) * BLOCK;
                batch[n].dst_offset = (uint64_t)i * BLOCK;
                batch[n].len = BLOCK;
            }
            size_t pushed = 0;
            CHECK(ferry_queue_submit(queue, batch, n, &pushed) == FERRY_RESULT_OK);
            sent += pushed;
        }
        ferry_completion out[64];
        size_t n = 0;
        CHECK(ferry_queue_poll(queue, out, 64, &n) == FERRY_RESULT_OK);
        for (size_t k = 0; k < n; k++) CHECK(out[k].status == FERRY_STATUS_OK && out[k].tag == done + k);
        done += n;
    }
    for (size_t i = 0; i < COUNT; i++)
        CHECK(memcmp(d + i * BLOCK, s + ((i * 389) % COUNT) * BLOCK, BLOCK) == 0);
    ferry_worker_stats stats;
    CHECK(ferry_engine_stats(engine, 0, &stats) == FERRY_RESULT_OK);
    printf("%d copies over GDR: %llu work requests, %llu doorbells, %llu completions\n", COUNT,
           (unsigned long long)stats.work_requests, (unsigned long long)stats.doorbells,
           (unsigned long long)stats.nic_completions);
    /* Destinations are adjacent, so sources gather into scatter/gather lists: fewer requests. */
    CHECK(stats.nic == 1 && stats.work_requests > 0 && stats.work_requests < COUNT && stats.nic_errors == 0);
    ferry_queue_free(queue);
    ferry_host_buffer_free(src);
    ferry_host_buffer_free(dst);
    ferry_engine_free(engine);
    printf("c gdr: ok\n");
    return 0;
}
