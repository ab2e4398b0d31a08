/* JPEG decoding through libjpeg(-turbo), the library PIL decodes with: same inverse DCT
 * (JDCT_ISLOW), same fancy upsampling and colour conversion, so the RGB bytes are PIL's
 * `Image.open(path).convert("RGB")`. Called from moco-data/src/jpeg.rs.
 *
 * Return codes: 0 decoded, 1 error (message in `err`), 2 a colour space left to the Rust
 * decoder (CMYK / YCCK, where PIL's conversion is its own). */
#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

struct moco_err {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    int truncated;
};

static void on_error(j_common_ptr cinfo) {
    longjmp(((struct moco_err *)cinfo->err)->jump, 1);
}

/* Warnings do not stop libjpeg (PIL ignores them too), except a premature end of the data:
 * libjpeg pads the image with grey where PIL reports "image file is truncated". */
static void on_message(j_common_ptr cinfo, int level) {
    struct moco_err *e = (struct moco_err *)cinfo->err;
    if (level == -1 && cinfo->err->msg_code == JWRN_JPEG_EOF) e->truncated = 1;
}

static void message(j_common_ptr cinfo, char *err, size_t err_len) {
    char buf[JMSG_LENGTH_MAX];
    cinfo->err->format_message(cinfo, buf);
    snprintf(err, err_len, "%s", buf);
}

/* Decodes `data` into `out` (`width * height * 3` bytes, `out_len` checked) when `out` is not
 * NULL; stores the size in `width`, `height` either way. */
int moco_jpeg_decode_rgb(const unsigned char *data, size_t len, unsigned char *out,
                         size_t out_len, size_t *width, size_t *height, char *err,
                         size_t err_len) {
    struct jpeg_decompress_struct cinfo;
    struct moco_err jerr;
    /* Locals changed after setjmp and read after the jump must be volatile. */
    volatile int status = 0;
    cinfo.err = jpeg_std_error(&jerr.pub);
    jerr.pub.error_exit = on_error;
    jerr.pub.emit_message = on_message;
    jerr.truncated = 0;
    if (setjmp(jerr.jump)) {
        message((j_common_ptr)&cinfo, err, err_len);
        jpeg_destroy_decompress(&cinfo);
        return 1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, (unsigned long)len);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space != JCS_GRAYSCALE && cinfo.jpeg_color_space != JCS_YCbCr &&
        cinfo.jpeg_color_space != JCS_RGB) {
        jpeg_destroy_decompress(&cinfo);
        return 2;
    }
    cinfo.out_color_space = JCS_RGB;
    *width = cinfo.image_width;
    *height = cinfo.image_height;
    if (out == NULL) {
        jpeg_destroy_decompress(&cinfo);
        return 0;
    }
    jpeg_start_decompress(&cinfo);
    size_t stride = (size_t)cinfo.output_width * 3;
    if (cinfo.output_components != 3 || stride * cinfo.output_height > out_len) {
        snprintf(err, err_len, "decoder output %ux%ux%d does not fit %zu bytes",
                 cinfo.output_width, cinfo.output_height, cinfo.output_components, out_len);
        status = 1;
    } else {
        while (cinfo.output_scanline < cinfo.output_height) {
            JSAMPROW row = out + (size_t)cinfo.output_scanline * stride;
            jpeg_read_scanlines(&cinfo, &row, 1);
            if (jerr.truncated) break;
        }
        if (!jerr.truncated) jpeg_finish_decompress(&cinfo);
        if (jerr.truncated) {
            snprintf(err, err_len, "image file is truncated (premature end of JPEG data)");
            status = 1;
        }
    }
    jpeg_destroy_decompress(&cinfo);
    return status;
}
