/*
 * kvmflow's dirtying guest: a 32-bit multiboot kernel that keeps N MiB of RAM dirty.
 *
 * Command line (-append): "mib=N pause=P mark=M". Each sweep writes one byte in every 4 KiB
 * page of N MiB starting at 2 MiB, then spins P thousand pause instructions. With mark=1 the
 * rest of each of those pages first holds MARKER over and over: a known pattern a capture
 * of the migration stream can look for (found in the clear, never through TLS). The number of
 * completed sweeps is kept at physical address 0x7000, so a host can see the guest run
 * (HMP "xp /1wx 0x7000").
 */

#define MB_MAGIC 0x1BADB002u
#define MB_FLAGS 0x00000003u /* align modules, want memory info */
#define MB_BOOTLOADER_MAGIC 0x2BADB002u
#define DIRTY_BASE 0x200000u
#define PAGE 4096u

__attribute__((section(".multiboot"), used, aligned(4)))
static const unsigned int multiboot_header[3] = {MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)};

struct multiboot_info {
    unsigned int flags, mem_lower, mem_upper, boot_device, cmdline;
};

static const char MARKER[] = "KVMFLOW-GUEST-MEMORY-MARKER-7f3a9c";

static volatile unsigned int *const sweeps = (volatile unsigned int *)0x7000;

static void outb(unsigned short port, unsigned char value) {
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static unsigned char inb(unsigned short port) {
    unsigned char value;
    __asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static void outw(unsigned short port, unsigned short value) {
    __asm__ volatile("outw %0, %1" : : "a"(value), "Nd"(port));
}

/* Word i of sector s as written by sweep g (the host computes the same). */
static unsigned int sector_word(unsigned int s, unsigned int g, unsigned int i) {
    if (i == 0) return 0x5346564bu; /* "KVFS" */
    if (i == 1) return s;
    if (i == 2) return g;
    return g * 0x9e3779b1u + s * 0x85ebca6bu + i;
}

static void ata_write_sector(unsigned int lba, unsigned int g) {
    while (inb(0x1f7) & 0x80) {} /* busy */
    outb(0x1f6, (unsigned char)(0xe0 | ((lba >> 24) & 0x0f)));
    outb(0x1f2, 1);
    outb(0x1f3, (unsigned char)lba);
    outb(0x1f4, (unsigned char)(lba >> 8));
    outb(0x1f5, (unsigned char)(lba >> 16));
    outb(0x1f7, 0x30); /* WRITE SECTORS */
    while (!(inb(0x1f7) & 0x08)) {} /* data request */
    for (unsigned int i = 0; i < 128; i++) {
        unsigned int word = sector_word(lba, g, i);
        outw(0x1f0, (unsigned short)word);
        outw(0x1f0, (unsigned short)(word >> 16));
    }
    while (inb(0x1f7) & 0x80) {} /* written */
}

static void serial_write(const char *text) {
    while (*text) outb(0x3f8, (unsigned char)*text++);
}

static unsigned int option(const char *cmdline, const char *key, unsigned int fallback) {
    for (const char *p = cmdline; *p; p++) {
        const char *k = key, *q = p;
        while (*k && *q == *k) k++, q++;
        if (*k == 0 && *q == '=' && (p == cmdline || p[-1] == ' ')) {
            unsigned int value = 0;
            for (q++; *q >= '0' && *q <= '9'; q++) value = value * 10 + (unsigned int)(*q - '0');
            return value;
        }
    }
    return fallback;
}

void kmain(unsigned int magic, const struct multiboot_info *info) {
    unsigned int mib = 16, pause = 0, mark = 0, disk = 0;
    if (magic == MB_BOOTLOADER_MAGIC && (info->flags & 4u)) {
        const char *cmdline = (const char *)info->cmdline;
        mib = option(cmdline, "mib", mib);
        pause = option(cmdline, "pause", pause);
        mark = option(cmdline, "mark", mark);
        disk = option(cmdline, "disk", disk);
    }
    if (magic == MB_BOOTLOADER_MAGIC && (info->flags & 1u)) {
        unsigned int usable = info->mem_upper / 1024u; /* MiB above 1 MiB */
        if (usable < 4u) mib = 0;
        else if (mib > usable - 3u) mib = usable - 3u;
    }
    serial_write("kvmflow dirty guest running\n");
    volatile unsigned char *base = (volatile unsigned char *)DIRTY_BASE;
    unsigned long span = (unsigned long)mib << 20;
    *sweeps = 0;
    if (mark && span) {
        /* One page of pattern, then copied word by word: byte-wise it takes minutes for
         * hundreds of MiB in a nested guest. */
        for (unsigned long at = 16; at < PAGE; at++)
            base[at] = (unsigned char)MARKER[(at - 16) % (sizeof(MARKER) - 1)];
        volatile unsigned int *words = (volatile unsigned int *)base;
        for (unsigned long page = PAGE; page < span; page += PAGE)
            for (unsigned long word = 4; word < PAGE / 4; word++)
                words[page / 4 + word] = words[word];
    }
    for (;;) {
        for (unsigned long offset = 0; offset < span; offset += PAGE) base[offset]++;
        if (disk) ata_write_sector(*sweeps % disk, *sweeps);
        (*sweeps)++;
        for (unsigned int i = 0; i < pause; i++)
            for (unsigned int j = 0; j < 1000u; j++) __builtin_ia32_pause();
    }
}

__asm__(
    ".section .bss\n"
    ".align 16\n"
    "stack_bottom: .skip 16384\n"
    "stack_top:\n"
    ".section .text\n"
    ".global _start\n"
    "_start:\n"
    "  mov $stack_top, %esp\n"
    "  push %ebx\n"
    "  push %eax\n"
    "  call kmain\n"
    "1: hlt\n"
    "  jmp 1b\n");
