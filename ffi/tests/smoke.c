/* A C client of libferry: copies through the engine, checks every completion and the bytes,
 * and checks the API conventions (NULL arguments, error text, busy deregistration). */
#include "check.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(void) {
    CHECK(ferry_abi_version() == FERRY_ABI_VERSION);
    ferry_config config;
    memset(&config, 0, sizeof config);
    config.unpinned = 1;
    ferry_engine *engine = NULL;
    CHECK(ferry_engine_start(&config, &engine) == FERRY_RESULT_OK);

    uint32_t client = 0;
    CHECK(ferry_engine_new_client(engine, &client) == FERRY_RESULT_OK);
    ferry_host_buffer *src = NULL, *dst = NULL;
    CHECK(ferry_host_alloc(engine, client, 1 << 20, &src) == FERRY_RESULT_OK);
    CHECK(ferry_host_alloc(engine, client, 1 << 20, &dst) == FERRY_RESULT_OK);
    uint8_t *s = ferry_host_buffer_data(src), *d = ferry_host_buffer_data(dst);
    for (int i = 0; i < (1 << 20); i++) s[i] = (uint8_t)(i * 13 + 5);

    /* The queue is opened, handed off and attached again, as a client in another process would
     * attach it; while the first handle held the client end, an attach was refused. */
    ferry_queue *opened = NULL, *queue = NULL;
    CHECK(ferry_queue_open(engine, client, 0, 0, &opened) == FERRY_RESULT_OK);
    CHECK(ferry_queue_fd(opened) >= 0);
    CHECK(ferry_queue_attach(ferry_queue_fd(opened), &queue) != FERRY_RESULT_OK && queue == NULL);
    int fd = -1;
    CHECK(ferry_queue_hand_off(opened, &fd) == FERRY_RESULT_OK && fd >= 0);
    CHECK(ferry_queue_attach(fd, &queue) == FERRY_RESULT_OK);
    close(fd);
    ferry_worker_stats stats;
    CHECK(ferry_engine_stats(engine, 0, &stats) == FERRY_RESULT_OK && stats.queues == 1);

    enum { N = 100 };
    ferry_descriptor descs[N + 1];
    memset(descs, 0, sizeof descs);
    for (int i = 0; i < N; i++) {
        descs[i].tag = (uint64_t)i;
        descs[i].src_region = ferry_host_buffer_region(src);
        descs[i].dst_region = ferry_host_buffer_region(dst);
        descs[i].src_offset = (uint64_t)(N - 1 - i) * 4096;
        descs[i].dst_offset = (uint64_t)i * 4096;
        descs[i].len = 4096;
    }
    descs[N] = descs[0];
    descs[N].tag = N;
    descs[N].len = 0; /* invalid: zero length */
    size_t pushed = 0;
    CHECK(ferry_queue_submit(queue, descs, N + 1, &pushed) == FERRY_RESULT_OK);
    CHECK(pushed == N + 1);

    ferry_completion done[N + 1];
    size_t got = 0;
    for (long spins = 0; got < N + 1 && spins < 2000000000L; spins++) {
        size_t n = 0;
        CHECK(ferry_queue_poll(queue, done + got, N + 1 - got, &n) == FERRY_RESULT_OK);
        got += n;
    }
    CHECK(got == N + 1);
    for (int i = 0; i < N; i++) {
        CHECK(done[i].tag == (uint64_t)i && done[i].seq == (uint64_t)i);
        CHECK(done[i].status == FERRY_STATUS_OK && done[i].bytes == 4096);
        CHECK(memcmp(d + (size_t)i * 4096, s + (size_t)(N - 1 - i) * 4096, 4096) == 0);
    }
    CHECK(done[N].status == FERRY_STATUS_ZERO_LENGTH && done[N].bytes == 0);
    CHECK(ferry_queue_watermark(queue) == N + 1);

    /* poll_wait: waits for its minimum; with nothing in flight it returns 0 at the timeout. */
    CHECK(ferry_queue_submit(queue, descs, N, &pushed) == FERRY_RESULT_OK && pushed == N);
    size_t n = 0;
    CHECK(ferry_queue_poll_wait(queue, done, N, N, 5000000000ull, &n) == FERRY_RESULT_OK && n == N);
    CHECK(done[N - 1].tag == N - 1 && done[N - 1].status == FERRY_STATUS_OK);
    CHECK(ferry_queue_poll_wait(queue, done, N, 1, 1000000ull, &n) == FERRY_RESULT_OK && n == 0);
    CHECK(ferry_queue_poll_wait(queue, done, 1, 2, 0, &n) == FERRY_RESULT_INVALID_ARGUMENT);

    /* A gate holds the copy behind it until the gate word reaches its value. */
    ferry_descriptor gated[2] = {{.tag = 100, .flags = FERRY_FLAG_GATE, .src_offset = 9}, descs[0]};
    gated[1].tag = 101;
    uint64_t before = ferry_queue_pushed(queue);
    CHECK(ferry_queue_submit(queue, gated, 2, &pushed) == FERRY_RESULT_OK && pushed == 2);
    CHECK(ferry_queue_pushed(queue) == before + 2);
    CHECK(ferry_queue_poll_wait(queue, done, 2, 1, 20000000ull, &n) == FERRY_RESULT_OK && n == 0);
    CHECK(ferry_queue_signal(queue, 9) == FERRY_RESULT_OK);
    CHECK(ferry_queue_poll_wait(queue, done, 2, 2, 5000000000ull, &n) == FERRY_RESULT_OK && n == 2);
    CHECK(done[0].tag == 100 && done[0].status == FERRY_STATUS_OK && done[1].tag == 101 && done[1].status == FERRY_STATUS_OK);
    CHECK(ferry_queue_watermark(queue) == ferry_queue_pushed(queue));
    /* A queue whose gates time out after 30 ms: the gate completes GATE_TIMEOUT, the copy goes on. */
    ferry_queue_config qc = {.gate_timeout_ns = 30000000ull};
    ferry_queue *timed;
    CHECK(ferry_queue_open_with(engine, client, &qc, &timed) == FERRY_RESULT_OK);
    CHECK(ferry_queue_submit(timed, gated, 2, &pushed) == FERRY_RESULT_OK && pushed == 2);
    CHECK(ferry_queue_poll_wait(timed, done, 2, 2, 5000000000ull, &n) == FERRY_RESULT_OK && n == 2);
    CHECK(done[0].status == FERRY_STATUS_GATE_TIMEOUT && done[1].status == FERRY_STATUS_OK);
    CHECK(ferry_queue_open_with(engine, client, NULL, &timed) == FERRY_RESULT_NULL_ARGUMENT);
    ferry_queue_free(timed);
    /* A notification writes its slot once the copy before it is done; the slot is cleared for the next. */
    ferry_descriptor noted[2] = {descs[0], {.tag = 102, .flags = FERRY_FLAG_NOTIFY, .src_offset = 5, .dst_offset = 3}};
    uint64_t slot = 1;
    CHECK(ferry_queue_slot(queue, 3, &slot) == FERRY_RESULT_OK && slot == 0);
    CHECK(ferry_queue_submit(queue, noted, 2, &pushed) == FERRY_RESULT_OK && pushed == 2);
    CHECK(ferry_queue_poll_wait(queue, done, 2, 2, 5000000000ull, &n) == FERRY_RESULT_OK && n == 2);
    CHECK(done[1].tag == 102 && done[1].status == FERRY_STATUS_OK);
    CHECK(ferry_queue_slot(queue, 3, &slot) == FERRY_RESULT_OK && slot == 5);
    CHECK(ferry_queue_clear_slot(queue, 3) == FERRY_RESULT_OK);
    CHECK(ferry_queue_slot(queue, 3, &slot) == FERRY_RESULT_OK && slot == 0);
    CHECK(ferry_queue_slot(queue, FERRY_NOTIFY_SLOTS, &slot) == FERRY_RESULT_INVALID_ARGUMENT);
    /* Stream ordering needs the GPU transport's CUDA context: a clear error here. */
    CHECK(ferry_queue_stream_wait(engine, queue, NULL, 1) == FERRY_RESULT_INVALID_ARGUMENT);
    char why[256];
    CHECK(ferry_last_error(why, sizeof why) > 0 && strstr(why, "no CUDA context") != NULL);
    CHECK(ferry_queue_stream_signal(engine, queue, NULL, 1) == FERRY_RESULT_INVALID_ARGUMENT);
    CHECK(ferry_queue_stream_wait_slot(engine, queue, NULL, 0, 1) == FERRY_RESULT_INVALID_ARGUMENT);

    /* An engine in a daemon: none listens here, a clear error (tests/serve.rs and the Python
       tests connect to a real one). */
    ferry_engine *remote = NULL;
    CHECK(ferry_engine_connect("/nonexistent/ferry.sock", &remote) == FERRY_RESULT_SYSTEM_ERROR && remote == NULL);
    CHECK(ferry_last_error(why, sizeof why) > 0 && strstr(why, "connecting to the daemon") != NULL);
    CHECK(ferry_engine_connect(NULL, &remote) == FERRY_RESULT_NULL_ARGUMENT);

    /* Conventions: NULL arguments are refused with a text, outputs untouched. */
    CHECK(ferry_queue_submit(queue, NULL, 1, &pushed) == FERRY_RESULT_NULL_ARGUMENT);
    char text[128];
    CHECK(ferry_last_error(text, sizeof text) > 0 && strstr(text, "descs") != NULL);
    CHECK(ferry_deregister(engine, 0xdead0000u) == FERRY_RESULT_UNKNOWN_REGION);
    CHECK(ferry_deregister(engine, ferry_host_buffer_region(src)) == FERRY_RESULT_OK);

    ferry_queue_free(queue);
    ferry_host_buffer_free(src);
    ferry_host_buffer_free(dst);
    ferry_engine_free(engine);
    ferry_engine_free(NULL);
    printf("c smoke: ok\n");
    return 0;
}
