/* A WASI command in C: greets its first argument (or $GREETING's target), lists
 * what it finds in the preopened /out directory, and exits with its second
 * argument as its exit code (0 without one). */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    const char *greeting = getenv("GREETING");
    const char *name = argc > 1 ? argv[1] : "world";
    printf("%s, %s, from C\n", greeting ? greeting : "hello", name);
    DIR *out = opendir("/out");
    if (out != NULL) {
        int entries = 0;
        for (struct dirent *entry; (entry = readdir(out)) != NULL;)
            entries += entry->d_name[0] != '.';
        closedir(out);
        printf("/out holds %d files\n", entries);
    }
    fflush(stdout);
    return argc > 2 ? atoi(argv[2]) : 0;
}
