/* nbdkit-xxh3-filter: the checksum work nbdmirror must do, added to nbdkit.
 *
 * A ceiling probe for benches/nbdbench.py (server `nbdkit-xxh3`), not part of
 * nbdmirror. Every 4 KiB-aligned write computes an xxh3-64 of each 4 KiB
 * block, seeded with the block number, into a table in memory (as nbdmirror's
 * store does on arrival); every aligned read recomputes the checksums of what
 * it read and compares them with the table (as nbdmirror verifies reads). A
 * mismatch is only counted (nbdkit -v shows it at exit): concurrent writes to
 * one block may race between the table and the file here, and a probe must
 * not fail a benchmark run. Nothing is journaled or made durable beyond what
 * the plugin does.
 *
 * So nbdkit's architecture (16 threads, blocking pread/pwrite) doing the same
 * per-byte checksum work is the fair upper bound for "seqwrite with checksums
 * on": see benches/README.md, "Tenth session".
 *
 * Build (the harness does this): cc -O2 -march=native -fPIC -shared
 *   -o nbdkit-xxh3-filter.so nbdkit-xxh3-filter.c
 * Needs the Debian packages nbdkit-plugin-dev and libxxhash-dev.
 */
#define NBDKIT_API_VERSION 2
#define XXH_INLINE_ALL
#include <xxhash.h>
#include <nbdkit-filter.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 4096

static uint64_t *sums;
static uint64_t nblocks;
static uint64_t mismatches;

static int
xxh3_prepare (nbdkit_next *next, void *handle, int readonly)
{
  int64_t size = next->get_size (next);
  if (size < 0)
    return -1;
  if (sums == NULL) {
    nblocks = (uint64_t) size / BLOCK;
    sums = calloc (nblocks + 1, sizeof *sums);
    if (sums == NULL) {
      nbdkit_error ("calloc: out of memory");
      return -1;
    }
  }
  return 0;
}

static int
xxh3_pwrite (nbdkit_next *next, void *handle, const void *buf,
             uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  const char *p = buf;
  if (offset % BLOCK == 0 && count % BLOCK == 0) {
    for (uint32_t i = 0; i < count / BLOCK; i++) {
      uint64_t b = offset / BLOCK + i;
      if (b < nblocks)
        __atomic_store_n (&sums[b],
                          XXH3_64bits_withSeed (p + (size_t) i * BLOCK, BLOCK, b),
                          __ATOMIC_RELAXED);
    }
  }
  return next->pwrite (next, buf, count, offset, flags, err);
}

static int
xxh3_pread (nbdkit_next *next, void *handle, void *buf,
            uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  int r = next->pread (next, buf, count, offset, flags, err);
  if (r == -1 || offset % BLOCK != 0 || count % BLOCK != 0)
    return r;
  const char *p = buf;
  for (uint32_t i = 0; i < count / BLOCK; i++) {
    uint64_t b = offset / BLOCK + i;
    if (b >= nblocks)
      break;
    uint64_t want = __atomic_load_n (&sums[b], __ATOMIC_RELAXED);
    /* 0: never written through this filter (this run's file starts out
     * holding whatever the harness left there). */
    if (want != 0 && want != XXH3_64bits_withSeed (p + (size_t) i * BLOCK, BLOCK, b))
      __atomic_add_fetch (&mismatches, 1, __ATOMIC_RELAXED);
  }
  return r;
}

static void
xxh3_unload (void)
{
  nbdkit_debug ("xxh3 filter: %llu read blocks did not match their checksum",
                (unsigned long long) mismatches);
  free (sums);
}

static struct nbdkit_filter filter = {
  .name = "xxh3",
  .longname = "xxh3-64 per 4 KiB block on write, verified on read",
  .unload = xxh3_unload,
  .prepare = xxh3_prepare,
  .pwrite = xxh3_pwrite,
  .pread = xxh3_pread,
};

NBDKIT_REGISTER_FILTER (filter)
