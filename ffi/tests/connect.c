/* A C client of a `ferry serve` daemon (its socket is argv[1]): the same calls as on an engine
 * started in the process, after ferry_engine_connect: a client, host memory from the daemon, a
 * queue, a copy checked byte for byte; a pool shared by two connections; a memfd of this
 * process registered by the daemon; what a connected engine refuses. */
#define _GNU_SOURCE

#include "check.h"

#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static int copy_and_check(ferry_queue *queue, uint32_t src, uint32_t dst, uint64_t dst_offset, uint64_t len) {
    ferry_descriptor d = {.tag = 7, .src_region = src, .dst_region = dst, .dst_offset = dst_offset, .len = len};
    size_t pushed = 0, n = 0;
    ferry_completion done[1];
    CHECK(ferry_queue_submit(queue, &d, 1, &pushed) == FERRY_RESULT_OK && pushed == 1);
    CHECK(ferry_queue_poll_wait(queue, done, 1, 1, 5000000000ull, &n) == FERRY_RESULT_OK && n == 1);
    CHECK(done[0].tag == 7);
    return (int)done[0].status;
}

int main(int argc, char **argv) {
    CHECK(argc == 2);
    ferry_engine *engine = NULL;
    CHECK(ferry_engine_connect(argv[1], &engine) == FERRY_RESULT_OK && engine != NULL);
    uint32_t client = 0;
    CHECK(ferry_engine_new_client(engine, &client) == FERRY_RESULT_OK && client != 0);
    ferry_host_buffer *src, *dst;
    CHECK(ferry_host_alloc(engine, client, 1 << 16, &src) == FERRY_RESULT_OK);
    CHECK(ferry_host_alloc(engine, client, 1 << 16, &dst) == FERRY_RESULT_OK);
    CHECK(ferry_host_buffer_len(src) == 1 << 16);
    memcpy(ferry_host_buffer_data(src), "from C, through the daemon", 26);
    ferry_queue *queue;
    CHECK(ferry_queue_open(engine, client, 0, 0, &queue) == FERRY_RESULT_OK);
    CHECK(copy_and_check(queue, ferry_host_buffer_region(src), ferry_host_buffer_region(dst), 512, 26) == FERRY_STATUS_OK);
    CHECK(memcmp((char *)ferry_host_buffer_data(dst) + 512, "from C, through the daemon", 26) == 0);

    /* A pool shared by a second connection: the region allocated on one is mapped on the other. */
    ferry_engine *other = NULL;
    CHECK(ferry_engine_connect(argv[1], &other) == FERRY_RESULT_OK);
    uint32_t a = 0, b = 0;
    CHECK(ferry_engine_shared_client(engine, "c-pool", &a) == FERRY_RESULT_OK);
    CHECK(ferry_engine_shared_client(other, "c-pool", &b) == FERRY_RESULT_OK && a == b);
    ferry_host_buffer *pool, *seen;
    CHECK(ferry_host_alloc(engine, a, 4096, &pool) == FERRY_RESULT_OK);
    memcpy(ferry_host_buffer_data(pool), "pooled", 6);
    CHECK(ferry_host_map(other, b, ferry_host_buffer_region(pool), &seen) == FERRY_RESULT_OK);
    CHECK(ferry_host_buffer_len(seen) == 4096 && memcmp(ferry_host_buffer_data(seen), "pooled", 6) == 0);
    CHECK(ferry_host_map(other, b, 0xdead, &seen) == FERRY_RESULT_INVALID_ARGUMENT);

    /* A memfd of this process, sealed, registered by the daemon: its bytes are shared. */
    int fd = memfd_create("c-client", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    CHECK(fd >= 0 && ftruncate(fd, 8192) == 0 && fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) == 0);
    char *mine = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(mine != MAP_FAILED);
    ferry_host_buffer *given;
    CHECK(ferry_host_register_memfd(engine, client, fd, &given) == FERRY_RESULT_OK);
    CHECK(copy_and_check(queue, ferry_host_buffer_region(src), ferry_host_buffer_region(given), 4096, 26) == FERRY_STATUS_OK);
    CHECK(memcmp(mine + 4096, "from C, through the daemon", 26) == 0);
    int unsealed = memfd_create("c-unsealed", MFD_CLOEXEC);
    CHECK(unsealed >= 0 && ftruncate(unsealed, 4096) == 0);
    ferry_host_buffer *refused = NULL;
    CHECK(ferry_host_register_memfd(engine, client, unsealed, &refused) != FERRY_RESULT_OK && refused == NULL);

    /* What a connected engine cannot do says so. */
    uint32_t region = 0;
    CHECK(ferry_register_host(engine, client, (uint8_t *)mine, 4096, &region) == FERRY_RESULT_INVALID_ARGUMENT);
    char why[256];
    CHECK(ferry_last_error(why, sizeof why) > 0 && strstr(why, "connected to a ferry serve daemon") != NULL);
    CHECK(ferry_queue_stream_wait(engine, queue, NULL, 1) == FERRY_RESULT_INVALID_ARGUMENT);

    CHECK(ferry_deregister(engine, ferry_host_buffer_region(given)) == FERRY_RESULT_OK);
    ferry_host_buffer_free(given);
    munmap(mine, 8192);
    close(fd);
    close(unsealed);
    ferry_host_buffer_free(seen);
    ferry_host_buffer_free(pool);
    ferry_engine_free(other);
    ferry_queue_free(queue);
    ferry_host_buffer_free(src);
    ferry_host_buffer_free(dst);
    ferry_engine_free(engine);
    printf("c connect: ok\n");
    return 0;
}
