/* Anti-aliased bilinear resizing of CT slices, bit-identical to Pillow's BILINEAR resize of mode "F" images,
 * with the HU windowing of slicefm.preprocess.windows.apply_windows_uint8 optionally fused in.
 *
 * The filter (the definition this file implements; it is the one Pillow documents for BILINEAR):
 *   scale = n_in / n_out, fs = max(scale, 1), support = fs;
 *   output pixel o has centre c = (o + 0.5) * scale and reads inputs [lo, hi) with
 *   lo = max(0, (int)(c - support + 0.5)), hi = min(n_in, (int)(c + support + 0.5));
 *   the weight of input i is tri(((double)i - c + 0.5) * (1 / fs)), tri(v) = max(0, 1 - |v|), each divided
 *   by the sum of the output's weights.
 * Rows are resized first (double accumulation from 0.0 in input order, the sum rounded to float32), then
 * columns (the same, on the float32 intermediate). Every output is the same sum, in the same order, as
 * Pillow's scalar loop: vectorising across independent outputs does not change a single rounding, and
 * -ffp-contract=off (setup.py) keeps the compiler from fusing a multiply and an add into one FMA rounding.
 * Results are therefore identical on every x86-64 CPU (SSE2 or AVX2 code paths) and equal to Pillow's.
 *
 * Windowing (fused): for each channel, t = (float)v * scale; t = t + offset; clip t to [0.5, 255.5];
 * uint8 = truncate(t). float32 arithmetic throughout, as numpy does it.
 *
 * The GIL is released while a call works, so threads can share a process.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_CHANNELS 16
#define ROWS 4 /* rows resized together by the horizontal pass (one SIMD lane each) */

typedef struct {
    int n_out;
    int ksize;
    int *lo;    /* [n_out] first input index */
    int *n;     /* [n_out] inputs read */
    double *w;  /* [n_out * ksize] normalised weights */
} Taps;

static void taps_free(Taps *t) {
    free(t->lo);
    free(t->n);
    free(t->w);
    t->lo = t->n = NULL;
    t->w = NULL;
}

static int taps_init(Taps *t, int n_in, int n_out) {
    double scale = (double)n_in / n_out;
    double fs = scale < 1.0 ? 1.0 : scale;
    double support = fs;
    double inv = 1.0 / fs;
    int o, i;
    t->n_out = n_out;
    t->ksize = (int)ceil(support) * 2 + 1;
    t->lo = malloc(sizeof(int) * (size_t)n_out);
    t->n = malloc(sizeof(int) * (size_t)n_out);
    t->w = calloc((size_t)n_out * (size_t)t->ksize, sizeof(double));
    if (!t->lo || !t->n || !t->w) {
        taps_free(t);
        return -1;
    }
    for (o = 0; o < n_out; o++) {
        double c = (o + 0.5) * scale;
        double sum = 0.0;
        double *w = t->w + (size_t)o * t->ksize;
        int lo = (int)(c - support + 0.5);
        int hi = (int)(c + support + 0.5);
        if (lo < 0) lo = 0;
        if (hi > n_in) hi = n_in;
        if (hi - lo > t->ksize) hi = lo + t->ksize; /* cannot happen; guards the buffer */
        for (i = 0; i < hi - lo; i++) {
            double v = ((double)(i + lo) - c + 0.5) * inv;
            if (v < 0.0) v = -v;
            w[i] = v < 1.0 ? 1.0 - v : 0.0;
            sum += w[i];
        }
        if (sum != 0.0) {
            for (i = 0; i < hi - lo; i++) w[i] /= sum;
        }
        t->lo[o] = lo;
        t->n[o] = hi - lo;
    }
    return 0;
}

typedef struct {
    const char *base;    /* first element of the slice */
    Py_ssize_t s_row;    /* byte strides */
    Py_ssize_t s_col;
    int is_int16;
} Plane;

/* Four doubles: one SIMD register with AVX2, two with SSE2. Element-wise IEEE operations, so the rounding is
 * the same whichever instructions carry them. */
typedef double v4d __attribute__((vector_size(32), aligned(32)));

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

typedef long long v4l __attribute__((vector_size(32)));

/* One row of the plane as doubles (exact for int16 and float32); contiguous rows convert in a SIMD loop. */
MULTIVERSION
static void row_to_double(const Plane *p, int w_in, const char *row, double *dst) {
    int x;
    if (p->is_int16 && p->s_col == (Py_ssize_t)sizeof(int16_t)) {
        const int16_t *src = (const int16_t *)row;
        for (x = 0; x < w_in; x++) dst[x] = src[x];
    } else if (!p->is_int16 && p->s_col == (Py_ssize_t)sizeof(float)) {
        const float *src = (const float *)row;
        for (x = 0; x < w_in; x++) dst[x] = src[x];
    } else {
        for (x = 0; x < w_in; x++) {
            const char *ptr = row + x * p->s_col;
            dst[x] = p->is_int16 ? (double)*(const int16_t *)ptr : (double)*(const float *)ptr;
        }
    }
}

/* Rows y..y+3 of the plane (the last row repeated past `last`) into blk, x-major: blk[x] = the four rows at x.
 * `rowbuf` holds 4 rows of w_in + 3 doubles (each row padded to a multiple of 4). */
MULTIVERSION
static void load_rows(const Plane *p, int w_in, int y, int last, v4d *blk, double *rowbuf) {
    int r, x, stride = (w_in + 3) & ~3;
    double *rows[ROWS];
    for (r = 0; r < ROWS; r++) {
        rows[r] = rowbuf + (size_t)r * stride;
        row_to_double(p, w_in, p->base + (Py_ssize_t)(y + r <= last ? y + r : last) * p->s_row, rows[r]);
    }
    for (x = 0; x + 4 <= w_in; x += 4) {
        v4d a, b, c, d;
        memcpy(&a, rows[0] + x, sizeof a);
        memcpy(&b, rows[1] + x, sizeof b);
        memcpy(&c, rows[2] + x, sizeof c);
        memcpy(&d, rows[3] + x, sizeof d);
        v4d t0 = __builtin_shuffle(a, b, (v4l){0, 4, 2, 6}), t1 = __builtin_shuffle(a, b, (v4l){1, 5, 3, 7});
        v4d t2 = __builtin_shuffle(c, d, (v4l){0, 4, 2, 6}), t3 = __builtin_shuffle(c, d, (v4l){1, 5, 3, 7});
        blk[x] = __builtin_shuffle(t0, t2, (v4l){0, 1, 4, 5});
        blk[x + 1] = __builtin_shuffle(t1, t3, (v4l){0, 1, 4, 5});
        blk[x + 2] = __builtin_shuffle(t0, t2, (v4l){2, 3, 6, 7});
        blk[x + 3] = __builtin_shuffle(t1, t3, (v4l){2, 3, 6, 7});
    }
    for (; x < w_in; x++) blk[x] = (v4d){rows[0][x], rows[1][x], rows[2][x], rows[3][x]};
}

/* Rows [r0, r1) of the plane, resized along x into tmp[(y - r0) * n_out + o] (float32). Four rows at a time,
 * one per vector lane: every lane is one output's scalar sum, in input order from 0.0. */
MULTIVERSION
static void horizontal(const Plane *p, int w_in, int r0, int r1, const Taps *tx, float *tmp, v4d *blk,
                       double *rowbuf) {
    int y, o, t, r;
    for (y = r0; y < r1; y += ROWS) {
        int nr = r1 - y < ROWS ? r1 - y : ROWS;
        load_rows(p, w_in, y, r1 - 1, blk, rowbuf);
        for (o = 0; o < tx->n_out; o++) {
            const double *w = tx->w + (size_t)o * tx->ksize;
            const v4d *src = blk + tx->lo[o];
            float *dst = tmp + (size_t)(y - r0) * tx->n_out + o;
            v4d acc = {0.0, 0.0, 0.0, 0.0};
#pragma GCC unroll 4
            for (t = 0; t < tx->n[o]; t++) acc += src[t] * w[t];
            if (nr == ROWS) {
                dst[0] = (float)acc[0];
                dst[tx->n_out] = (float)acc[1];
                dst[2 * (size_t)tx->n_out] = (float)acc[2];
                dst[3 * (size_t)tx->n_out] = (float)acc[3];
            } else {
                for (r = 0; r < nr; r++) dst[(size_t)r * tx->n_out] = (float)acc[r];
            }
        }
    }
}

/* Output row yy along y from the float32 intermediate (its row 0 is input row r0) into dst[n_x]. */
MULTIVERSION
static void vertical_row(const float *tmp, int n_x, int r0, const Taps *ty, int yy, double *acc, float *dst) {
    const double *w = ty->w + (size_t)yy * ty->ksize;
    int t, x;
    for (x = 0; x < n_x; x++) acc[x] = 0.0;
    for (t = 0; t < ty->n[yy]; t++) {
        const float *row = tmp + (size_t)(ty->lo[yy] + t - r0) * n_x;
        double wt = w[t];
        for (x = 0; x < n_x; x++) acc[x] += (double)row[x] * wt;
    }
    for (x = 0; x < n_x; x++) dst[x] = (float)acc[x];
}

MULTIVERSION
static void window_row(const float *v, int n, float scale, float offset, uint8_t *out) {
    int x;
    for (x = 0; x < n; x++) {
        float t = v[x] * scale;
        t = t + offset;
        t = t < 0.5f ? 0.5f : t;
        t = t > 255.5f ? 255.5f : t;
        out[x] = (uint8_t)(int32_t)t; /* t in [0.5, 255.5]: the same truncation, and it vectorises */
    }
}

typedef struct {
    Py_buffer src, dst;
    int z, h, w, oh, ow, n_win;
    float scale[MAX_CHANNELS], offset[MAX_CHANNELS];
} Job;

/* The whole job, without the GIL. Returns 0, or -1 when out of memory. */
static int run_job(const Job *j) {
    Taps tx = {0}, ty = {0};
    int need_x = j->ow != j->w, need_y = j->oh != j->h;
    int rc = -1, k, yy, c;
    int r0 = 0, r1 = j->h;
    float *tmp = NULL, *row = NULL;
    v4d *blk = NULL;
    double *acc = NULL, *rowbuf = NULL;
    if (taps_init(&tx, j->w, j->ow) || taps_init(&ty, j->h, j->oh)) goto done;
    if (need_y) {
        r0 = ty.lo[0];
        r1 = ty.lo[j->oh - 1] + ty.n[j->oh - 1];
    }
    tmp = malloc(sizeof(float) * (size_t)(r1 - r0) * (size_t)j->ow);
    blk = aligned_alloc(sizeof(v4d), sizeof(v4d) * (size_t)j->w);
    acc = malloc(sizeof(double) * (size_t)j->ow);
    rowbuf = malloc(sizeof(double) * (size_t)ROWS * (size_t)((j->w + 3) & ~3));
    row = malloc(sizeof(float) * (size_t)j->ow);
    if (!tmp || !blk || !acc || !row || !rowbuf) goto done;
    for (k = 0; k < j->z; k++) {
        Plane p = {(const char *)j->src.buf + k * j->src.strides[0], j->src.strides[1], j->src.strides[2],
                   j->src.format[0] == 'h'};
        if (need_x) {
            horizontal(&p, j->w, r0, r1, &tx, tmp, blk, rowbuf);
        } else { /* no horizontal pass: the intermediate is the input, as float32 */
            int y, x;
            for (y = r0; y < r1; y++) {
                row_to_double(&p, j->w, p.base + (Py_ssize_t)y * p.s_row, rowbuf);
                for (x = 0; x < j->w; x++) tmp[(size_t)(y - r0) * j->ow + x] = (float)rowbuf[x];
            }
        }
        for (yy = 0; yy < j->oh; yy++) {
            const float *v;
            if (need_y) {
                vertical_row(tmp, j->ow, r0, &ty, yy, acc, row);
                v = row;
            } else {
                v = tmp + (size_t)yy * j->ow;
            }
            if (j->n_win == 0) {
                float *out = (float *)j->dst.buf + ((size_t)k * j->oh + yy) * j->ow;
                memcpy(out, v, sizeof(float) * (size_t)j->ow);
            } else {
                for (c = 0; c < j->n_win; c++) {
                    uint8_t *out = (uint8_t *)j->dst.buf + (((size_t)k * j->n_win + c) * j->oh + yy) * j->ow;
                    window_row(v, j->ow, j->scale[c], j->offset[c], out);
                }
            }
        }
    }
    rc = 0;
done:
    taps_free(&tx);
    taps_free(&ty);
    free(tmp);
    free(blk);
    free(acc);
    free(rowbuf);
    free(row);
    return rc;
}

static int get_buffers(PyObject *src, PyObject *dst, Job *j, const char *dst_format, int dst_ndim) {
    if (PyObject_GetBuffer(src, &j->src, PyBUF_STRIDES | PyBUF_FORMAT) < 0) return -1;
    if (PyObject_GetBuffer(dst, &j->dst, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&j->src);
        return -1;
    }
    const char *sf = j->src.format, *df = j->dst.format;
    if (j->src.ndim != 3 || !(strcmp(sf, "h") == 0 || strcmp(sf, "f") == 0)) {
        PyErr_Format(PyExc_ValueError, "src must be int16 or float32 [z, h, w], got format %s ndim %d", sf,
                     j->src.ndim);
    } else if (j->dst.ndim != dst_ndim || strcmp(df, dst_format) != 0) {
        PyErr_Format(PyExc_ValueError, "dst must have format %s and %d dimensions, got %s and %d", dst_format,
                     dst_ndim, df, j->dst.ndim);
    } else if (j->dst.shape[0] != j->src.shape[0]) {
        PyErr_Format(PyExc_ValueError, "src has %zd slices, dst %zd", j->src.shape[0], j->dst.shape[0]);
    } else if (j->src.shape[1] < 1 || j->src.shape[2] < 1 || j->src.shape[1] > INT_MAX / 8 ||
               j->src.shape[2] > INT_MAX / 8) {
        PyErr_SetString(PyExc_ValueError, "src slices must be non-empty");
    } else {
        j->z = (int)j->src.shape[0];
        j->h = (int)j->src.shape[1];
        j->w = (int)j->src.shape[2];
        j->oh = (int)j->dst.shape[dst_ndim - 2];
        j->ow = (int)j->dst.shape[dst_ndim - 1];
        if (j->oh < 1 || j->ow < 1) {
            PyErr_SetString(PyExc_ValueError, "dst slices must be non-empty");
        } else {
            return 0;
        }
    }
    PyBuffer_Release(&j->src);
    PyBuffer_Release(&j->dst);
    return -1;
}

static PyObject *finish(Job *j) {
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = run_job(j);
    Py_END_ALLOW_THREADS PyBuffer_Release(&j->src);
    PyBuffer_Release(&j->dst);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyDoc_STRVAR(resize_doc,
             "resize(src, dst)\n\nResize every slice of src (int16 or float32 [z, h, w], any strides) into dst "
             "(float32 [z, oh, ow], C-contiguous).");

static PyObject *py_resize(PyObject *self, PyObject *args) {
    PyObject *src, *dst;
    Job j;
    memset(&j, 0, sizeof j);
    if (!PyArg_ParseTuple(args, "OO", &src, &dst)) return NULL;
    if (get_buffers(src, dst, &j, "f", 3)) return NULL;
    return finish(&j);
}

PyDoc_STRVAR(resize_windows_doc,
             "resize_windows(src, dst, scales, offsets)\n\nResize every slice of src (int16 or float32 [z, h, w]) "
             "and window it into dst (uint8 [z, C, oh, ow], C-contiguous): channel c is "
             "trunc(clip(v * scales[c] + offsets[c], 0.5, 255.5)) in float32.");

static PyObject *py_resize_windows(PyObject *self, PyObject *args) {
    PyObject *src, *dst, *scales, *offsets;
    Py_ssize_t c, n;
    Job j;
    memset(&j, 0, sizeof j);
    if (!PyArg_ParseTuple(args, "OOOO", &src, &dst, &scales, &offsets)) return NULL;
    scales = PySequence_Fast(scales, "scales must be a sequence");
    if (!scales) return NULL;
    offsets = PySequence_Fast(offsets, "offsets must be a sequence");
    if (!offsets) {
        Py_DECREF(scales);
        return NULL;
    }
    n = PySequence_Fast_GET_SIZE(scales);
    if (n < 1 || n > MAX_CHANNELS || PySequence_Fast_GET_SIZE(offsets) != n) {
        PyErr_Format(PyExc_ValueError, "need 1 to %d windows and one offset per scale", MAX_CHANNELS);
        goto fail;
    }
    for (c = 0; c < n; c++) {
        double s = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(scales, c));
        double o = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(offsets, c));
        if (PyErr_Occurred()) goto fail;
        j.scale[c] = (float)s;
        j.offset[c] = (float)o;
    }
    j.n_win = (int)n;
    Py_DECREF(scales);
    Py_DECREF(offsets);
    if (get_buffers(src, dst, &j, "B", 4)) return NULL;
    if (j.dst.shape[1] != j.n_win) {
        PyErr_Format(PyExc_ValueError, "dst has %zd channels for %d windows", j.dst.shape[1], j.n_win);
        PyBuffer_Release(&j.src);
        PyBuffer_Release(&j.dst);
        return NULL;
    }
    return finish(&j);
fail:
    Py_DECREF(scales);
    Py_DECREF(offsets);
    return NULL;
}

static PyMethodDef methods[] = {
    {"resize", py_resize, METH_VARARGS, resize_doc},
    {"resize_windows", py_resize_windows, METH_VARARGS, resize_windows_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_bilinear",
    "Anti-aliased bilinear slice resizing (Pillow-identical) with fused HU windowing.", -1, methods,
};

PyMODINIT_FUNC PyInit__bilinear(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "MAX_CHANNELS", MAX_CHANNELS) < 0) Py_CLEAR(m);
    return m;
}
