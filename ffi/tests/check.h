/* The check of the C test programs (smoke.c, churn.c, gdr.c, connect.c): on failure, print the condition
 * and ferry's last error text, and return 1 from main. */
#ifndef FERRY_TESTS_CHECK_H
#define FERRY_TESTS_CHECK_H

#include "ferry.h"

#include <stdio.h>

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            char check_text_[512];                                                    \
            ferry_last_error(check_text_, sizeof check_text_);                        \
            fprintf(stderr, "%s:%d: check failed: %s (last error: %s)\n", __FILE__,  \
                    __LINE__, #cond, check_text_);                                    \
            return 1;                                                                 \
        }                                                                             \
    } while (0)

#endif
