/* A batch of JPEGs decoded by nvJPEG's batched API into buffers the caller owns, with no
 * host synchronisation (data.gpu_decoder=nvjpeg; data/nvjpeg_batch.py builds and loads it).
 *
 * torchvision's decode_jpeg(device="cuda") waits on the host for every batch it decodes and
 * serialises all callers on one lock. Here the GPU work is queued on the caller's stream and
 * the call returns; the next decode on the same slot waits only for the batch decoded two calls
 * earlier (two jpeg states used in turn, each guarded by an event), so a decode thread can
 * prepare batch k+1 while the GPU still decodes batch k. One decoder per thread.
 *
 * Return codes: 0 success, an nvjpegStatus_t (1..), or 1000 + a cudaError_t. */
#include <stdlib.h>

#include <cuda_runtime_api.h>
#include <nvjpeg.h>

#define SLOTS 2
#define CUDA_FAIL(e) (1000 + (int)(e))

typedef struct {
    nvjpegHandle_t handle;
    nvjpegJpegStream_t parser;          /* header parsing for the batched-support check */
    nvjpegJpegState_t state[SLOTS];     /* one per call in flight */
    cudaEvent_t done[SLOTS];            /* recorded after each slot's last decode */
    nvjpegImage_t *images[SLOTS];       /* destinations, kept until that decode has run */
    int used[SLOTS];
    int next;
    int hardware;                       /* 1: the JPEG engines (A100, H100, ...) */
} nvjb_t;

void nvjb_destroy(nvjb_t *d) {
    if (!d) return;
    for (int s = 0; s < SLOTS; s++) {
        if (d->used[s]) cudaEventSynchronize(d->done[s]);
        if (d->done[s]) cudaEventDestroy(d->done[s]);
        if (d->state[s]) nvjpegJpegStateDestroy(d->state[s]);
        free(d->images[s]);
    }
    if (d->parser) nvjpegJpegStreamDestroy(d->parser);
    if (d->handle) nvjpegDestroy(d->handle);
    free(d);
}

int nvjb_create(nvjb_t **out, int *hardware) {
    nvjb_t *d = (nvjb_t *)calloc(1, sizeof *d);
    if (!d) return NVJPEG_STATUS_ALLOCATOR_FAILURE;
    d->hardware = 1;
    nvjpegStatus_t st = nvjpegCreateEx(NVJPEG_BACKEND_HARDWARE, NULL, NULL,
                                       NVJPEG_FLAGS_DEFAULT, &d->handle);
    if (st != NVJPEG_STATUS_SUCCESS) { /* no JPEG engine here: nvJPEG's default backend */
        d->hardware = 0;
        d->handle = NULL;
        st = nvjpegCreateEx(NVJPEG_BACKEND_DEFAULT, NULL, NULL, NVJPEG_FLAGS_DEFAULT,
                            &d->handle);
    }
    if (st == NVJPEG_STATUS_SUCCESS) st = nvjpegJpegStreamCreate(d->handle, &d->parser);
    for (int s = 0; s < SLOTS && st == NVJPEG_STATUS_SUCCESS; s++) {
        st = nvjpegJpegStateCreate(d->handle, &d->state[s]);
        if (st == NVJPEG_STATUS_SUCCESS) {
            cudaError_t e = cudaEventCreateWithFlags(&d->done[s], cudaEventDisableTiming);
            if (e != cudaSuccess) {
                nvjb_destroy(d);
                return CUDA_FAIL(e);
            }
        }
    }
    if (st != NVJPEG_STATUS_SUCCESS) {
        nvjb_destroy(d);
        return (int)st;
    }
    *hardware = d->hardware;
    *out = d;
    return 0;
}

/* Per image: info[4 i ..] = (components, height, width, batched decode supported). An image
 * nvJPEG cannot read gets (0, 0, 0, 0) and is left to the caller's fallback. */
int nvjb_info(nvjb_t *d, int n, const unsigned char *const *data, const size_t *lengths,
              int *info) {
    for (int i = 0; i < n; i++) {
        int comps = 0, w[NVJPEG_MAX_COMPONENT], h[NVJPEG_MAX_COMPONENT];
        nvjpegChromaSubsampling_t sub;
        int *row = info + 4 * i;
        row[0] = row[1] = row[2] = row[3] = 0;
        if (nvjpegGetImageInfo(d->handle, data[i], lengths[i], &comps, &sub, w, h)
                != NVJPEG_STATUS_SUCCESS || sub == NVJPEG_CSS_UNKNOWN)
            continue;
        row[0] = comps;
        row[1] = h[0];
        row[2] = w[0];
        if (comps != 1 && comps != 3) continue; /* CMYK, YCCK: the fallback */
        if (d->hardware) {
            int unsupported = 1;
            if (nvjpegJpegStreamParseHeader(d->handle, data[i], lengths[i], d->parser)
                    == NVJPEG_STATUS_SUCCESS)
                nvjpegDecodeBatchedSupported(d->handle, d->parser, &unsupported);
            row[3] = unsupported == 0;
        } else {
            row[3] = 1;
        }
    }
    return 0;
}

/* Decode n images (all batched-supported, see nvjb_info) as planar RGB: image i's three planes
 * at outputs[i], outputs[i] + h w, outputs[i] + 2 h w (device memory), on `stream`. Returns
 * once the work is queued; the inputs and outputs must stay alive until it has run (the
 * caller keeps them until its next-but-one call on this decoder, which waits for it). */
int nvjb_decode(nvjb_t *d, int n, const unsigned char *const *data, const size_t *lengths,
                unsigned char *const *outputs, const int *heights, const int *widths,
                void *stream) {
    cudaStream_t cs = (cudaStream_t)stream;
    int s = d->next;
    d->next = (s + 1) % SLOTS;
    if (d->used[s]) {
        cudaError_t e = cudaEventSynchronize(d->done[s]);
        if (e != cudaSuccess) return CUDA_FAIL(e);
    }
    nvjpegImage_t *img = (nvjpegImage_t *)realloc(d->images[s], (size_t)(n > 0 ? n : 1) *
                                                  sizeof *img);
    if (!img) return NVJPEG_STATUS_ALLOCATOR_FAILURE;
    d->images[s] = img;
    for (int i = 0; i < n; i++) {
        size_t plane = (size_t)heights[i] * (size_t)widths[i];
        for (int c = 0; c < NVJPEG_MAX_COMPONENT; c++) {
            img[i].channel[c] = c < 3 ? outputs[i] + c * plane : NULL;
            img[i].pitch[c] = c < 3 ? (size_t)widths[i] : 0;
        }
    }
    nvjpegStatus_t st = nvjpegDecodeBatchedInitialize(d->handle, d->state[s], n, 1,
                                                      NVJPEG_OUTPUT_RGB);
    if (st == NVJPEG_STATUS_SUCCESS)
        st = nvjpegDecodeBatched(d->handle, d->state[s], data, lengths, img, cs);
    cudaError_t e = cudaEventRecord(d->done[s], cs);
    d->used[s] = 1;
    if (st != NVJPEG_STATUS_SUCCESS) return (int)st;
    return e == cudaSuccess ? 0 : CUDA_FAIL(e);
}
